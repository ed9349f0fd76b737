"""Storing a new message: stream its content, then commit it durably.

`NewMessage` is made by `Spool.new_message()`; see its docstring for the
order of the calls and what `finish()` promises.
"""

import fcntl
import os

from ..runtime import process
from ..runtime.device_waits import datasync, device_bound, fsync
from .spool_files import (LOCAL, NEW, READY, SpoolError, WRITE_BLOCK, create_file, debug,
                          fsync_directory, identity, log_event, unlink_quietly, write_all,
                          write_file_durably)


class NewMessage:
    """A message being stored: stream the content, then commit.

    Use: `write(data)` as often as needed (memory does not grow with the
    message), `commit_content()`, `write_envelope(env)` (the `.new` file that
    filters see), then `finish(env)`; or `abandon()` at any point. After
    `finish()` returns, the message is on disk for good. When no filter has
    to see the message, `finish(env)` may follow the writes directly: it
    commits the content and writes the envelope itself; or `prepare(env)`
    writes both files first, so that `finish(env)` is left only the syncs
    and renames (the part that waits for the device).

    The content file is open and `flock`ed from its creation until the
    message is committed (or abandoned), so that another process's
    recover() never takes it for a leftover, whichever pid namespace it
    runs in.
    """

    def __init__(self, spool):
        self.spool = spool
        self.id, self.content_path, self._fd = spool._create_content()
        self.new_envelope_path = spool.path(self.id, NEW)
        self.size = 0
        self._buf = bytearray()
        self._content_synced = False
        self._envelope_fd = None
        self._envelope_unsynced = False
        # Identities of the files as we synced them, recorded once they are
        # exposed to filters (write_envelope() before finish()).
        self._synced = None
        self._done = False

    def write(self, data):
        """Appends content bytes."""
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= WRITE_BLOCK:
            self._flush()

    def _flush(self):
        write_all(self._fd, self._buf)
        self._buf.clear()

    def commit_content(self):
        """Writes out and fsyncs the content file (once).

        The file stays open, and locked, until finish(), disown() or abandon().
        """
        fd = self._fd
        if fd is None or self._content_synced:
            return
        try:
            self._flush()
            datasync(fd)
        except BaseException:
            self._close_content()
            raise
        self._content_synced = True

    def _close_content(self):
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @process.spool_privileged
    def write_envelope(self, env):
        """Writes and fsyncs the `.envelope.new` file (replacing any earlier one).

        The file stays locked until finish() or abandon(), so that another
        process's recover() never takes it for an orphan.
        """
        self._write_envelope(env)
        self._synced = {self.content_path: identity(os.stat(self.content_path)),
                        self.new_envelope_path: identity(os.fstat(self._envelope_fd))}

    @process.spool_privileged
    def prepare(self, env):
        """Writes out the content and the `.envelope.new` file, without syncing either.

        For a message no filter sees: `finish(env)`, with the same `env`,
        then syncs and commits them.
        """
        if self._fd is not None:
            self._flush()
        self._write_envelope(env, sync=False)

    def _write_envelope(self, env, sync=True):
        if self._envelope_fd is None:
            self._envelope_fd = create_file(self.new_envelope_path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            fcntl.flock(self._envelope_fd, fcntl.LOCK_EX)
        else:
            os.ftruncate(self._envelope_fd, 0)
            os.lseek(self._envelope_fd, 0, os.SEEK_SET)
        fd = self._envelope_fd
        write_all(fd, env.to_bytes())
        self._envelope_unsynced = not sync
        if sync:
            datasync(fd)

    @device_bound
    @process.spool_privileged
    def finish(self, env):
        """Commits the message; returns its id. The caller may then reply 250.

        `.envelope.new` becomes `.envelope`; when `env.to_local` is not empty
        a `.envelope.local` copy is made too, and with no remote recipients
        the `.local` file is the only envelope. Files a filter changed are
        fsync'd again; the directory is fsync'd last. Raises SpoolError if a
        filter removed the files, OSError on I/O failure; after an OSError
        no envelope is left for the forwarder, and abandon() removes the rest.
        """
        self.commit_content()
        if self._envelope_fd is None:
            self._write_envelope(env)
        elif self._envelope_unsynced:
            datasync(self._envelope_fd)
            self._envelope_unsynced = False
        if self._synced is not None:
            for path in (self.content_path, self.new_envelope_path):
                self._resync_if_changed(path)
        local, ready = self.spool.path(self.id, LOCAL), self.spool.path(self.id, READY)
        if env.to_local and env.to_remote:
            with open(self.new_envelope_path, "rb") as f:
                data = f.read()
            tmp = self.spool.path(self.id, LOCAL + ".tmp")
            write_file_durably(tmp, data)
            os.rename(tmp, local)
            renamed, copy = ready, local
        else:
            renamed, copy = (local if env.to_local else ready), None
        try:
            os.rename(self.new_envelope_path, renamed)
            fsync_directory(self.spool.directory)
        except BaseException:
            self._uncommit(renamed, copy)
            raise
        self._release_envelope()
        self._close_content()
        self._done = True
        debug(self.id, "committed (%d octets)%s" % (self.size, " with a .local copy"
                                                    if env.to_local else ""))
        return self.id

    def _uncommit(self, renamed, copy):
        # The caller replies 4xx and the client sends the message again, so a
        # commit that may not be durable must not leave an envelope behind
        # for the forwarder: back to `.new`, which abandon() removes.
        if copy is not None:
            unlink_quietly(copy)
        try:
            os.rename(renamed, self.new_envelope_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log_event("warning", "spool: %s: cannot take back %s after a failed commit, it may "
                      "be sent twice: %s" % (self.id, os.path.basename(renamed), e))

    def _resync_if_changed(self, path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise SpoolError("message file removed before commit: %s" % os.path.basename(path)) from None
        if identity(st) != self._synced.get(path):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                fsync(fd)
            finally:
                os.close(fd)

    def _release_envelope(self):
        if self._envelope_fd is not None:
            os.close(self._envelope_fd)
            self._envelope_fd = None

    @process.spool_privileged
    def disown(self):
        """Lets go of the message without touching its files (a filter exited 100).

        The filter owns the files now (it may have removed or copied them);
        the directory is fsync'd so that what it left is as durable as a
        finished message. abandon() is a no-op afterwards. Returns True when
        the content is still in the spool: the filter stored the message in
        its own way (emailrelay-filter-copy's envelopes in sub-directories).
        """
        self.commit_content()
        self._release_envelope()
        self._close_content()
        self._done = True
        fsync_directory(self.spool.directory)
        debug(self.id, "left to the filter (exit 100)")
        return os.path.exists(self.content_path)

    @process.spool_privileged
    def abandon(self):
        """Removes whatever was written; safe to call twice, and after finish() a no-op."""
        if self._fd is not None:
            try:
                self._close_content()
            except OSError:
                pass
        self._release_envelope()
        if self._done:
            return
        self._done = True
        unlink_quietly(self.new_envelope_path)
        unlink_quietly(self.content_path)
        debug(self.id, "abandoned, files removed")
