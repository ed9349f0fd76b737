"""A POP3 maildrop: the committed messages one user may read, and its lock.

What callers may rely on:
- `maildrop_directory(spool_dir, user, by_name)` is the directory to serve:
  the spool directory, or with `--pop-by-name` the spool sub-directory
  named after the user, which must be a direct child of the spool (a
  symbolic link out of it is refused).
- A `Maildrop` lists the committed `.envelope` files of that directory.
  Sizes are content file sizes and UIDs are message ids, so both are
  stable across sessions. It is locked for one session at a time, across
  threads and processes (`flock` on LOCK_FILE in the directory), until
  `close()`.
- `Maildrop.update()` removes the messages marked deleted (the UPDATE
  state of RFC 1939); nothing is removed any other way.
- `open_content` opens a content file only as a regular file and never
  through a symbolic link.
"""

import errno
import fcntl
import os
import stat
import threading

from ..runtime import log, process

LOCK_FILE = ".emailrelay-pop.lock"


class MaildropError(Exception):
    """A maildrop cannot be opened; `text` is the -ERR reply text."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text


def valid_user_name(name):
    """True when `name` may name a --pop-by-name sub-directory.

    It must be a single, plain, printable path component: not empty, no
    '/', '\\', NUL, control or white-space characters, not starting with a
    dot (which rules out '.', '..' and hidden files such as the lock file),
    at most 255 characters.
    """
    if not name or len(name) > 255 or name.startswith("."):
        return False
    for c in name:
        if c in "/\\" or c.isspace() or not c.isprintable():
            return False
    return True


def maildrop_directory(spool_dir, user, by_name):
    """The directory to serve to `user`; raises MaildropError.

    Without --pop-by-name this is the spool directory. With it, the user's
    sub-directory, which must exist and whose real path must be a direct
    child of the spool directory's real path (a symbolic link out of the
    spool is refused).
    """
    if not by_name:
        return spool_dir
    if not valid_user_name(user):
        raise MaildropError("[AUTH] invalid user name for a maildrop")
    base = os.path.realpath(spool_dir)
    real = os.path.realpath(os.path.join(spool_dir, user))
    if os.path.dirname(real) != base:
        raise MaildropError("[SYS/PERM] maildrop is outside the spool directory")
    if not os.path.isdir(real):
        raise MaildropError("[SYS/PERM] no maildrop for this user")
    return real


class _MaildropLock:
    """Exclusive use of one maildrop directory, across threads and processes.

    `flock` locks belong to the open file, so two sessions in one process
    exclude each other as two processes do; the in-process set also keeps a
    second session from even opening the lock file.
    """

    _held = set()
    _guard = threading.Lock()

    def __init__(self, directory):
        self.key = os.path.realpath(directory)
        with self._guard:
            if self.key in self._held:
                raise MaildropError("[IN-USE] maildrop locked")
            self._held.add(self.key)
        try:
            with process.privileged(group=False):
                self.fd = os.open(os.path.join(self.key, LOCK_FILE),
                                  os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as e:
            self._forget()
            log.warning("pop: cannot open lock file in %s: %s" % (self.key, e.strerror))
            raise MaildropError("[SYS/TEMP] cannot lock maildrop") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self._forget()
            raise MaildropError("[IN-USE] maildrop locked") from None

    def _forget(self):
        with self._guard:
            self._held.discard(self.key)

    def release(self):
        """Unlocks; safe to call twice."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self._forget()


class Message:
    """One message of a session's maildrop, numbered from 1."""

    def __init__(self, number, message_id, envelope_path, content_path, size):
        self.number = number
        self.id = message_id
        self.envelope_path = envelope_path
        self.content_path = content_path
        self.size = size
        self.deleted = False


class Maildrop:
    """The locked, numbered view of a maildrop for one session.

    `directory` is the spool directory, or with `sub_directory` a user's
    sub-directory of it.

    The message list is fixed at login (RFC 1939: numbers and sizes do not
    change during a session); messages arriving later appear next session.
    """

    def __init__(self, spool, directory, sub_directory):
        self.directory = directory
        self.lock = _MaildropLock(directory)
        try:
            self.messages = self._scan(spool, directory if sub_directory else None)
        except OSError as e:
            self.lock.release()
            log.warning("pop: cannot read maildrop %s: %s" % (directory, e))
            raise MaildropError("[SYS/TEMP] cannot read maildrop") from None

    @staticmethod
    def _scan(spool, directory):
        messages = []
        # spool.committed() finds a sub-directory's shared content in the spool.
        for item in spool.committed(directory):
            try:
                with process.privileged(group=False):
                    st = os.lstat(item.content_path)
            except OSError:
                # Forwarded or deleted since the scan, or a stray envelope.
                continue
            if not stat.S_ISREG(st.st_mode):
                log.warning("pop: %s is not a regular file: not served" % item.content_path)
                continue
            messages.append(Message(len(messages) + 1, item.id, item.envelope_path,
                                    item.content_path, st.st_size))
        return messages

    def get(self, number_text):
        """The live message with this number (text from the client), or None."""
        if not number_text.isdigit():
            return None
        n = int(number_text)
        if 1 <= n <= len(self.messages) and not self.messages[n - 1].deleted:
            return self.messages[n - 1]
        return None

    def live(self):
        """Messages not marked deleted."""
        return [m for m in self.messages if not m.deleted]

    def update(self, spool):
        """Removes the messages marked deleted; returns how many could not be."""
        failures = 0
        for m in self.messages:
            if m.deleted:
                try:
                    spool.remove_envelope(m.envelope_path, m.content_path)
                except OSError as e:
                    log.warning("pop: cannot delete %s: %s" % (m.envelope_path, e))
                    failures += 1
        return failures

    def close(self):
        """Releases the lock; safe to call twice."""
        self.lock.release()


def open_content(path):
    """Opens a message's content file for reading; raises OSError.

    Only a regular file is opened, never through a symbolic link (a
    maildrop's content must not lead out of the spool), and a FIFO in its
    place cannot block the session.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
