"""The message store: E-MailRelay's spool directory, made durable.

A message is two files, `emailrelay.<pid>.<unix-time>.<seq>.content` and an
envelope whose suffix is its state:

    .envelope.new   being written; filters run on it (not yet acknowledged)
    .envelope       committed, ready to forward
    .envelope.busy  claimed by a forwarder (which holds an flock on it)
    .envelope.bad   failed; reasons appended at the end
    .envelope.local copy for local recipients

Durability (ours; E-MailRelay never calls fsync): the content is fsync'd,
the `.new` envelope is fsync'd, renamed to `.envelope`, and the directory is
fsync'd before `finish()` returns, so the caller may reply `250` after it.
(Files are synced with fdatasync where the platform has it: it writes the
data and the size, everything needed to read them back.)

Claiming is safe between processes sharing one spool: the claimer opens the
`.envelope`, takes an exclusive `flock` on it, and only then renames it to
`.busy`. The lock follows the inode through the rename, so a `.busy` file
whose lock can be taken has no live owner and `recover()` may return it to
`.envelope` without racing a claimer. (E-MailRelay's C++ binary does not
take that lock: do not run `recover()` while it forwards from the same spool.)

Files are created with mode 0660 (E-MailRelay's umask 117) via `os.open` and
`fchmod`, whatever the process umask (`main` sets a stricter one for
everything else). After --user, every operation
on spool paths runs in a root window with only the user id reclaimed
(`process.spool_privileged`), so new files belong to root and the --user
group and a root-only spool directory still works.
"""

import collections
import fcntl
import itertools
import os
import stat
import threading
import time

from . import process
from .envelope import SIZE_LIMIT, Envelope, EnvelopeError, reason_lines

FILE_MODE = 0o660
NEW, READY, BUSY, BAD, LOCAL = ".envelope.new", ".envelope", ".envelope.busy", ".envelope.bad", ".envelope.local"
ORPHAN = ".envelope.new.orphan"
CONTENT = ".content"
# A content file with no envelope, left by a process that died while
# receiving it, is renamed to this (never deleted).
CONTENT_ORPHAN = ".content.orphan"
# Seconds since a content file without an envelope was last written before
# recover() treats it as abandoned: a live session writes at least once per
# idle timeout, and this is ten times the default one.
ORPHAN_CONTENT_AGE = 600
# Longest first: a name is classified by the first suffix it ends with.
_STATES = ((ORPHAN, "orphan"), (NEW, "new"), (BUSY, "busy"), (BAD, "bad"), (LOCAL, "local"),
           (READY, "ready"))

Committed = collections.namedtuple("Committed", "id envelope_path content_path")

_sequence = itertools.count(1)
_sequence_lock = threading.Lock()
# Write content in blocks of this size (a 4 KiB message is one write).
WRITE_BLOCK = 65536

_pid_cache = []


def _pid():
    """os.getpid(), without a system call per message."""
    if not _pid_cache:
        _pid_cache.append(os.getpid())
    return _pid_cache[0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pid_cache.clear)


class SpoolError(Exception):
    """The spool cannot do what was asked (bad directory, vanished file, ...)."""


class ContentError(SpoolError):
    """A claimed message's content file cannot be read; the text says why."""


def _log(level, message):
    from . import log
    getattr(log, level)(message)


def _debug(message_id, change):
    """Logs a state change with --debug."""
    from . import log
    if log.debug_enabled():
        log.debug("spool: %s: %s" % (message_id, change))


def fsync_directory(directory):
    """Makes renames and creations in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# fdatasync() also writes the metadata needed to read the data back (the
# size of a new file), which is all a spool file needs; it skips timestamps.
_datasync = getattr(os, "fdatasync", os.fsync)


def _create(path, flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL):
    """Creates `path` with mode 0660 whatever the umask; returns the fd."""
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_file_durably(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
    """Writes `data` to a new file of mode 0660 and fsyncs it."""
    fd = _create(path, flags)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pid_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_alive(message_id):
    """True if the process named in a message id is another live process.

    recover() runs before this process stores anything, so a file with our
    own pid was left by an earlier process that had the same pid.
    """
    parts = message_id.split(".")
    if len(parts) == 4 and parts[1].isdigit():
        pid = int(parts[1])
        return pid != os.getpid() and _pid_running(pid)
    return False


def _try_lock(path):
    """Opens `path` and takes its flock without waiting.

    Returns the fd holding the lock, or None if someone holds it or the
    file is gone.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def _sort_key(message_id, path):
    """Oldest first: by the time, pid and sequence number in the name."""
    parts = message_id.split(".")
    if len(parts) == 4 and parts[0] == "emailrelay" and all(p.isdigit() for p in parts[1:]):
        return (int(parts[2]), int(parts[1]), int(parts[3]), message_id)
    try:
        mtime = int(os.stat(path).st_mtime)
    except OSError:
        mtime = 0
    return (mtime, 0, 0, message_id)


def _subdirectories(directory):
    """Immediate sub-directories of `directory` (not symbolic links)."""
    try:
        # A directory's link count is 2 + its sub-directories on most file
        # systems: the common case (no sub-directories) needs no listing.
        if os.stat(directory).st_nlink == 2:
            return []
        with os.scandir(directory) as it:
            return [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


@process.spool_privileged
def content_shared(content_path, except_path=None):
    """True if an envelope other than `except_path` refers to this content file.

    A content file is shared while any envelope (in any state) with the same
    id exists in its directory or in one of that directory's immediate
    sub-directories (`--pop-by-name` copies made by emailrelay-filter-copy).
    """
    directory, name = os.path.split(os.path.abspath(content_path))
    if not name.endswith(CONTENT):
        return False
    stem = name[:-len(CONTENT)]
    skip = os.path.abspath(except_path) if except_path else None
    for d in [directory] + _subdirectories(directory):
        for suffix, _ in _STATES:
            p = os.path.join(d, stem + suffix)
            if p != skip and os.path.lexists(p):
                return True
    return False


class Spool:
    """The spool directory: new messages, committed ids, claims and admin views."""

    def __init__(self, directory):
        if not os.path.isdir(directory):
            raise SpoolError("spool directory does not exist: %s" % directory)
        self.directory = os.path.abspath(directory)

    @process.spool_privileged
    def free_kbytes(self):
        """KiB available to us in the spool's file system now (None if unknown).

        One statvfs() call, cheap enough to make before every commit: a
        cached reading would let a burst of messages fill the disk.
        """
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize // 1024

    def path(self, message_id, suffix):
        """The path of a spool file, e.g. `path(id, '.envelope')`."""
        return os.path.join(self.directory, message_id + suffix)

    # -- storing

    def new_message(self):
        """Creates the content file of a new message; returns a NewMessage."""
        return NewMessage(self)

    @process.spool_privileged
    def _create_content(self):
        pid = _pid()
        while True:
            with _sequence_lock:
                seq = next(_sequence)
            message_id = "emailrelay.%d.%d.%d" % (pid, int(time.time()), seq)
            path = self.path(message_id, CONTENT)
            try:
                return message_id, path, _create(path)
            except FileExistsError:
                # Another process with our pid (a restart in the same
                # second, or a shared spool across pid namespaces).
                continue

    # -- listing

    def _scan(self, directory=None):
        with os.scandir(directory or self.directory) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                for suffix, state in _STATES:
                    if entry.name.endswith(suffix) and len(entry.name) > len(suffix):
                        try:
                            regular = entry.is_file()
                        except OSError:
                            regular = False
                        if regular:
                            yield entry.name[:-len(suffix)], state, entry.path
                        break

    @process.spool_privileged
    def ids(self):
        """Committed (`.envelope`) message ids, oldest first."""
        found = [(i, p) for i, state, p in self._scan() if state == "ready"]
        return [i for i, p in sorted(found, key=lambda ip: _sort_key(*ip))]

    @process.spool_privileged
    def list_messages(self):
        """Every envelope as `(id, state)`, oldest first.

        States: 'new', 'ready', 'busy', 'bad', 'local', 'orphan'.
        """
        found = [(i, s, p) for i, s, p in self._scan()]
        found.sort(key=lambda isp: (_sort_key(isp[0], isp[2]), isp[1]))
        return [(i, s) for i, s, p in found]

    @process.spool_privileged
    def committed(self, directory=None):
        """Committed envelopes of the spool or of one of its sub-directories.

        Returns `Committed(id, envelope_path, content_path)` tuples, oldest
        first. The content path is in the same directory if that file exists,
        else in the parent directory (where emailrelay-filter-copy leaves it).
        """
        directory = os.path.join(self.directory, directory) if directory else self.directory
        parent = os.path.dirname(os.path.abspath(directory))
        out = []
        for message_id, state, path in self._scan(directory):
            if state != "ready":
                continue
            content = os.path.join(directory, message_id + CONTENT)
            if directory != self.directory and not os.path.exists(content):
                content = os.path.join(parent, message_id + CONTENT)
            out.append((_sort_key(message_id, path), Committed(message_id, path, content)))
        out.sort(key=lambda kc: kc[0])
        return [c for k, c in out]

    @process.spool_privileged
    def failures(self):
        """`(id, reason)` for each `.bad` envelope; reason is the latest one ('' if none)."""
        out = []
        for message_id, state, path in self._scan():
            if state != "bad":
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                out.append((message_id, "cannot read envelope: %s" % e.strerror))
                continue
            reason = ""
            for line in data.splitlines():
                if line.startswith(b"X-MailRelay-Reason:"):
                    reason = line[19:].strip().decode("utf-8", "replace")
            out.append((message_id, reason))
        out.sort(key=lambda ir: _sort_key(ir[0], ""))
        return out

    @process.spool_privileged
    def unfail_all(self):
        """Renames every `.bad` envelope back to `.envelope`; returns how many."""
        count = 0
        for message_id, state, path in list(self._scan()):
            if state != "bad":
                continue
            try:
                os.rename(path, self.path(message_id, READY))
                count += 1
                _debug(message_id, "unfailed (.envelope)")
            except FileNotFoundError:
                continue
        return count

    # -- forwarding

    @process.spool_privileged
    def claim(self, message_id, failed=None):
        """Claims a committed message for forwarding.

        Returns a Claim (holding the envelope's lock) or None if another
        claimer won, the message is gone, or its envelope is corrupt (then it
        is renamed `.bad` with the reason appended, a warning logged, and
        `failed(reason)` called when given).
        """
        ready = self.path(message_id, READY)
        busy = self.path(message_id, BUSY)
        try:
            fd = os.open(ready, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as e:
            reason = "cannot open envelope: %s" % e.strerror
            self._fail_unreadable(message_id, ready, reason)
            if failed is not None:
                failed(reason)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(ready, busy)
            if os.fstat(fd).st_ino != os.stat(busy).st_ino:
                raise FileNotFoundError(busy)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        claim = Claim(self, message_id, fd)
        _debug(message_id, "claimed (.envelope.busy)")
        try:
            claim.envelope = Envelope.parse(_read_fd(fd))
        except (EnvelopeError, OSError) as e:
            reason = "invalid envelope file: %s" % (e,)
            _log("warning", "spool: %s: %s" % (os.path.basename(busy), reason))
            claim.fail(reason, 0)
            if failed is not None:
                failed(reason)
            return None
        return claim

    def _fail_unreadable(self, message_id, path, reason):
        _log("warning", "spool: %s: %s" % (os.path.basename(path), reason))
        try:
            os.rename(path, self.path(message_id, BAD))
        except OSError:
            pass

    # -- start-up

    @process.spool_privileged
    def recover(self):
        """Repairs what a dead process left behind; safe with live sharers.

        A `.envelope.new` whose lock is free and whose creating process is
        gone was never acknowledged: it is renamed `.envelope.new.orphan`
        (kept with its content, never forwarded) and logged. A `.busy`
        envelope whose lock is free has lost its forwarder: it goes back to
        `.envelope` and is logged. A `.content` file that no envelope refers
        to, whose creating process is gone and which nobody has written for
        ORPHAN_CONTENT_AGE seconds, was being received when its process died:
        it is renamed `.content.orphan` and logged. (The age keeps a message
        being received by a process in another pid namespace safe.)
        """
        for message_id, state, path in list(self._scan()):
            if state == "new":
                self._recover_new(message_id, path)
            elif state == "busy":
                self._recover_busy(message_id, path)
        self._recover_content()

    def _recover_content(self):
        with os.scandir(self.directory) as it:
            found = [(e.name[:-len(CONTENT)], e.path) for e in it
                     if e.name.endswith(CONTENT) and not e.name.startswith(".")]
        for message_id, path in found:
            if _writer_alive(message_id) or content_shared(path):
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if time.time() - st.st_mtime < ORPHAN_CONTENT_AGE:
                continue
            target = self.path(message_id, CONTENT_ORPHAN)
            if os.path.lexists(target):
                continue
            try:
                os.rename(path, target)
            except FileNotFoundError:
                continue
            _log("warning", "spool: content with no envelope moved aside: %s"
                 % (message_id + CONTENT_ORPHAN))

    def _recover_new(self, message_id, path):
        if _writer_alive(message_id):
            return
        fd = _try_lock(path)
        if fd is None:
            return
        try:
            os.rename(path, self.path(message_id, ORPHAN))
        finally:
            os.close(fd)
        _log("warning", "spool: unfinished message moved aside: %s (content %s)"
             % (message_id + ORPHAN, message_id + CONTENT))

    def _recover_busy(self, message_id, path):
        fd = _try_lock(path)
        if fd is None:
            return
        try:
            os.rename(path, self.path(message_id, READY))
        except FileNotFoundError:
            return
        finally:
            os.close(fd)
        _log("warning", "spool: %s: claim of a stopped process released" % (message_id + BUSY))

    # -- deleting (POP)

    @process.spool_privileged
    def remove_envelope(self, envelope_path, content_path):
        """Deletes an envelope, and its content unless another envelope refers to it."""
        os.unlink(envelope_path)
        if not content_shared(content_path, envelope_path):
            _unlink_quietly(content_path)
        _debug(os.path.basename(envelope_path), "removed")


def _read_fd(fd):
    """The file's bytes, at most SIZE_LIMIT + 1 of them (the parser refuses more)."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    left = SIZE_LIMIT + 1
    while left > 0:
        chunk = os.read(fd, min(65536, left))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class NewMessage:
    """A message being stored: stream the content, then commit.

    Use: `write(data)` as often as needed (memory does not grow with the
    message), `commit_content()`, `write_envelope(env)` (the `.new` file that
    filters see), then `finish(env)`; or `abandon()` at any point. After
    `finish()` returns, the message is on disk for good. When no filter has
    to see the message, `finish(env)` may follow the writes directly: it
    commits the content and writes the envelope itself.
    """

    def __init__(self, spool):
        self.spool = spool
        self.id, self.content_path, self._fd = spool._create_content()
        self.new_envelope_path = spool.path(self.id, NEW)
        self.size = 0
        self._buf = bytearray()
        self._envelope_fd = None
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
        _write_all(self._fd, self._buf)
        self._buf.clear()

    def commit_content(self):
        """Writes out and fsyncs the content file and closes it."""
        fd = self._fd
        if fd is None:
            return
        try:
            self._flush()
            _datasync(fd)
        except BaseException:
            self._close_content()
            raise
        self._close_content()

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
        self._synced = {self.content_path: _identity(os.stat(self.content_path)),
                        self.new_envelope_path: _identity(os.fstat(self._envelope_fd))}

    def _write_envelope(self, env):
        if self._envelope_fd is None:
            self._envelope_fd = _create(self.new_envelope_path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            fcntl.flock(self._envelope_fd, fcntl.LOCK_EX)
        else:
            os.ftruncate(self._envelope_fd, 0)
            os.lseek(self._envelope_fd, 0, os.SEEK_SET)
        fd = self._envelope_fd
        _write_all(fd, env.to_bytes())
        _datasync(fd)

    @process.spool_privileged
    def finish(self, env):
        """Commits the message; returns its id. The caller may then reply 250.

        `.envelope.new` becomes `.envelope`; when `env.to_local` is not empty
        a `.envelope.local` copy is made too, and with no remote recipients
        the `.local` file is the only envelope. Files a filter changed are
        fsync'd again; the directory is fsync'd last. Raises SpoolError if a
        filter removed the files, OSError on I/O failure.
        """
        self.commit_content()
        if self._envelope_fd is None:
            self._write_envelope(env)
        if self._synced is not None:
            for path in (self.content_path, self.new_envelope_path):
                self._resync_if_changed(path)
        if env.to_local and env.to_remote:
            with open(self.new_envelope_path, "rb") as f:
                data = f.read()
            tmp = self.spool.path(self.id, LOCAL + ".tmp")
            write_file_durably(tmp, data)
            os.rename(tmp, self.spool.path(self.id, LOCAL))
            os.rename(self.new_envelope_path, self.spool.path(self.id, READY))
        elif env.to_local:
            os.rename(self.new_envelope_path, self.spool.path(self.id, LOCAL))
        else:
            os.rename(self.new_envelope_path, self.spool.path(self.id, READY))
        fsync_directory(self.spool.directory)
        self._release_envelope()
        self._done = True
        _debug(self.id, "committed (%d octets)%s" % (self.size, " with a .local copy"
                                                      if env.to_local else ""))
        return self.id

    def _resync_if_changed(self, path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise SpoolError("message file removed before commit: %s" % os.path.basename(path)) from None
        if _identity(st) != self._synced.get(path):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
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
        finished message. abandon() is a no-op afterwards.
        """
        self.commit_content()
        self._release_envelope()
        self._done = True
        fsync_directory(self.spool.directory)
        _debug(self.id, "left to the filter (exit 100)")

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
        _unlink_quietly(self.new_envelope_path)
        _unlink_quietly(self.content_path)
        _debug(self.id, "abandoned, files removed")


def _identity(st):
    return (st.st_ino, st.st_size, st.st_mtime_ns)


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
        _debug(self.id, "released (.envelope)")

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
        _unlink_quietly(self.envelope_path)

    @process.spool_privileged
    def remove_content(self, close=True):
        """Removes the content unless another envelope refers to it; ends the claim.

        Closing the last descriptors of the removed files, when the file
        system frees them, is the slow part of a deletion and needs no
        privileges: with `close` false it is left to a later close().
        """
        try:
            if not content_shared(self.content_path, self.envelope_path):
                _unlink_quietly(self.content_path)
        finally:
            if close:
                self._unlock()
        _debug(self.id, "deleted")

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
            _write_all(self._fd, reason_lines(reason, code))
            os.fsync(self._fd)
            bad = self.spool.path(self.id, BAD)
            os.rename(self.envelope_path, bad)
            _log("info", "spool: failing envelope [%s] -> [%s]"
                 % (os.path.basename(self.envelope_path), os.path.basename(bad)))
        finally:
            self._unlock()
        _debug(self.id, "failed (.envelope.bad): %s" % reason)

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
        fd = _create(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_all(fd, env.to_bytes())
            os.fsync(fd)
            os.rename(tmp, self.envelope_path)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(self._fd)
        self._fd = fd
        self.envelope = env
