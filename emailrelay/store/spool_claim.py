"""A message claimed for forwarding: its `.busy` envelope, content and fate.

`Claim` is made by `Spool.claim()`; see its docstring for what a forwarder
may do with it.
"""

import fcntl
import os
import stat

from ..runtime import process
from . import spool_files
from .envelope import Envelope, reason_lines
from .spool_files import (BAD, BUSY, CONTENT, ContentError, READY, content_shared, create_file,
                          debug, unlink_quietly, write_all)


class Claim:
    """A message claimed for forwarding (its envelope is `.busy` and locked).

    `envelope` (parsed), `content_path`, `envelope_path`. End the claim with
    exactly one of release(), delete() or fail().
    """

    def __init__(self, spool, message_id, fd):
        self.spool = spool
        self.id = message_id
        self._fd = fd
        self._content = None
        self.envelope = None
        self.envelope_path = spool.path(message_id, BUSY)
        self.content_path = spool.path(message_id, CONTENT)

    def open_content(self):
        """The content file, opened for reading (the same file object each call).

        Only a regular file is opened (not a symbolic link, a directory or
        a FIFO, which would block); raises ContentError saying why not.
        Read it from the start with `seek(0)`; closed when the claim ends.
        """
        # Once open, no root window: the client asks for it several times a message.
        return self._content if self._content is not None else self._open_content()

    @process.spool_privileged
    def _open_content(self):
        if self._content is None:
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
                | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = os.open(self.content_path, flags)
            except OSError as e:
                raise ContentError("cannot open content file %s: %s"
                                   % (os.path.basename(self.content_path), e.strerror)) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ContentError("content file %s is not a regular file"
                                   % os.path.basename(self.content_path))
            self._content = os.fdopen(fd, "rb", buffering=0)
        return self._content

    def _unlock(self):
        if self._content is not None:
            self._content.close()
            self._content = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @process.spool_privileged
    def release(self):
        """Puts the message back to `.envelope` (to be tried again later)."""
        try:
            os.rename(self.envelope_path, self.spool.path(self.id, READY))
        finally:
            self._unlock()
        debug(self.id, "released (.envelope)")

    @process.spool_privileged
    def delete(self):
        """Removes the envelope, and the content unless another envelope refers to it."""
        try:
            self.remove_envelope()
        finally:
            self.remove_content()

    @process.spool_privileged
    def remove_envelope(self):
        """Removes the envelope's name: the message is gone from the queue.

        The first half of delete(), the only part that must happen before
        anything else is sent; remove_content() must follow (it may be
        called from another thread), and ends the claim.
        """
        unlink_quietly(self.envelope_path)

    @process.spool_privileged
    def remove_content(self, close=True):
        """Removes the content unless another envelope refers to it; ends the claim.

        Closing the last descriptors of the removed files, when the file
        system frees them, is the slow part of a deletion and needs no
        privileges: with `close` false it is left to a later close().
        """
        try:
            if not content_shared(self.content_path, self.envelope_path):
                unlink_quietly(self.content_path)
        finally:
            if close:
                self._unlock()
        debug(self.id, "deleted")

    def close(self):
        """Closes the claim's files (after remove_content(close=False))."""
        self._unlock()

    @process.spool_privileged
    def fail(self, reason, code=None):
        """Appends the reason (and code) to the envelope and renames it `.bad`.

        Any automatic-retry state is removed first, so that a message
        returned to the queue (emailrelay-resubmit) starts afresh. Logs
        `failing envelope`, as E-MailRelay does.
        """
        try:
            env = self.envelope
            if env is not None and env.retry() is not None:
                env.set_retry(None)
                self.rewrite(env)
            os.lseek(self._fd, 0, os.SEEK_END)
            write_all(self._fd, reason_lines(reason, code))
            os.fsync(self._fd)
            bad = self.spool.path(self.id, BAD)
            os.rename(self.envelope_path, bad)
            spool_files.log_event("info", "spool: failing envelope [%s] -> [%s]"
                                  % (os.path.basename(self.envelope_path), os.path.basename(bad)))
        finally:
            self._unlock()
        debug(self.id, "failed (.envelope.bad): %s" % reason)

    @process.spool_privileged
    def defer(self, state):
        """Records the retry `state` (an envelope.Retry) and releases the message."""
        env = self.envelope
        env.set_retry(state)
        self.rewrite(env)
        self.release()

    @process.spool_privileged
    def reread(self):
        """Reads the envelope again (a client filter may have edited it);
        raises OSError or EnvelopeError."""
        self.envelope = Envelope.read(self.envelope_path)
        return self.envelope

    @process.spool_privileged
    def rewrite(self, env):
        """Replaces the envelope with `env` atomically, keeping the claim's lock."""
        tmp = self.envelope_path + ".tmp"
        fd = create_file(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            write_all(fd, env.to_bytes())
            os.fsync(fd)
            os.rename(tmp, self.envelope_path)
        except BaseException:
            os.close(fd)
            unlink_quietly(tmp)
            raise
        os.close(self._fd)
        self._fd = fd
        self.envelope = env
