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

This module is the directory (`Spool`: new messages, listing, claiming,
recovery, the admin views); a new message is a `spool_message.NewMessage`,
a claimed one a `spool_claim.Claim`, and the names, errors and file
primitives they share are in `spool_files`. Other modules use the store
through this one.
"""

import collections
import fcntl
import itertools
import os
import threading
import time

from ..runtime import process
from . import spool_files
from .envelope import Envelope, EnvelopeError, SIZE_LIMIT
from .spool_claim import Claim
from .spool_files import (BAD, BUSY, CONTENT, CONTENT_ORPHAN, ContentError, ENVELOPE, NEW, READY,
                          STATES, SpoolError, WRITE_BLOCK, content_shared, create_file, debug,
                          fsync_directory, unlink_quietly, write_file_durably)
from .spool_message import NewMessage

# What other modules take from here, besides Spool.
__all__ = ["Spool", "Committed", "SpoolError", "ContentError", "NEW", "READY", "BUSY", "BAD",
           "CONTENT", "WRITE_BLOCK", "fsync_directory", "write_file_durably"]

Committed = collections.namedtuple("Committed", "id envelope_path content_path")

_sequence = itertools.count(1)
_sequence_lock = threading.Lock()

_pid_cache = []


def _pid():
    """os.getpid(), without a system call per message."""
    if not _pid_cache:
        _pid_cache.append(os.getpid())
    return _pid_cache[0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pid_cache.clear)


def _pid_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_pid(message_id):
    """The pid in a message id (`emailrelay.<pid>.<time>.<seq>`), or None."""
    parts = message_id.split(".")
    if len(parts) == 4 and parts[1].isdigit():
        return int(parts[1])
    return None


def _writer_alive(message_id):
    """True if the process named in a message id is another live process.

    recover() runs before this process stores anything, so a file with our
    own pid was left by an earlier process that had the same pid.
    """
    pid = _writer_pid(message_id)
    return pid is not None and pid != os.getpid() and _pid_running(pid)


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
    # (Tested one by one: a forwarding pass sorts every id in the spool.)
    if len(parts) == 4 and parts[0] == "emailrelay" and parts[1].isdigit() \
            and parts[2].isdigit() and parts[3].isdigit():
        return (int(parts[2]), int(parts[1]), int(parts[3]), message_id)
    try:
        mtime = int(os.stat(path).st_mtime)
    except OSError:
        mtime = 0
    return (mtime, 0, 0, message_id)


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
                fd = create_file(path)
            except FileExistsError:
                # Another process with our pid (a restart in the same
                # second, or a shared spool across pid namespaces).
                continue
            # Held until the message is committed: see recover().
            fcntl.flock(fd, fcntl.LOCK_EX)
            return message_id, path, fd

    # -- listing

    def _scan(self, directory=None):
        with os.scandir(directory or self.directory) as it:
            for entry in it:
                # Every state's suffix holds ENVELOPE: content files (half
                # of a spool) are passed over with one test.
                if ENVELOPE not in entry.name or entry.name.startswith("."):
                    continue
                for suffix, state in STATES:
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
                debug(message_id, "unfailed (.envelope)")
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
            st = os.fstat(fd)
            if st.st_ino != os.stat(busy).st_ino:
                raise FileNotFoundError(busy)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        claim = Claim(self, message_id, fd)
        debug(message_id, "claimed (.envelope.busy)")
        try:
            claim.envelope = Envelope.parse(_read_fd(fd, st.st_size))
        except (EnvelopeError, OSError) as e:
            reason = "invalid envelope file: %s" % (e,)
            spool_files.log_event("warning", "spool: %s: %s" % (os.path.basename(busy), reason))
            claim.fail(reason, 0)
            if failed is not None:
                failed(reason)
            return None
        return claim

    def _fail_unreadable(self, message_id, path, reason):
        spool_files.log_event("warning", "spool: %s: %s" % (os.path.basename(path), reason))
        try:
            os.rename(path, self.path(message_id, BAD))
        except OSError:
            pass

    # -- start-up

    @process.spool_privileged
    def recover(self, pid=None):
        """Repairs what dead processes left behind; safe with live sharers.

        Nothing that might be acknowledged mail is touched: a content file
        that any envelope refers to (`.envelope`, `.busy`, `.bad`,
        `.local`, `.new`, in the spool or a --pop-by-name sub-directory)
        stays. What is repaired, when the process that made it is gone
        (its pid is not running and its lock is free):

        - a `.busy` envelope goes back to `.envelope` (its forwarder died);
        - a `.envelope.new` was never acknowledged (`250` follows the
          rename to `.envelope`): it is removed, and its content unless
          another envelope refers to it;
        - a `.content` (or an older version's `.content.orphan`) that no
          envelope refers to is removed: the rest of a message already
          forwarded or deleted by POP, or one whose DATA never ended.
          (A live writer holds its content's lock until the envelope is
          committed, so a message being received is never taken.)

        With `pid`, only what that process left (a --workers worker that
        died; `.busy` files are the forwarder's, so they are left alone).
        Each removal is logged.
        """
        for message_id, state, path in list(self._scan()):
            if pid is not None and _writer_pid(message_id) != pid:
                continue
            if state == "new":
                self._recover_new(message_id, path)
            elif state == "busy" and pid is None:
                self._recover_busy(message_id, path)
        self._recover_content(pid)

    def _recover_content(self, pid):
        with os.scandir(self.directory) as it:
            found = [(e.name[:-len(suffix)], e.path) for e in it if not e.name.startswith(".")
                     for suffix in (CONTENT, CONTENT_ORPHAN) if e.name.endswith(suffix)]
        for message_id, path in found:
            if pid is not None and _writer_pid(message_id) != pid:
                continue
            if _writer_alive(message_id) or content_shared(self.path(message_id, CONTENT)):
                continue
            fd = _try_lock(path)
            if fd is None:
                continue
            try:
                # Looked at again under the lock: a writer that had just
                # committed has let go of it, and its envelope is there.
                if content_shared(self.path(message_id, CONTENT)):
                    continue
                unlink_quietly(path)
            finally:
                os.close(fd)
            spool_files.log_event("info", "spool: removed %s: no envelope refers to it"
                                  % os.path.basename(path))

    def _recover_new(self, message_id, path):
        if _writer_alive(message_id):
            return
        fd = _try_lock(path)
        if fd is None:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        finally:
            os.close(fd)
        content = self.path(message_id, CONTENT)
        kept = content_shared(content)
        if not kept:
            unlink_quietly(content)
        spool_files.log_event("warning", "spool: removed unacknowledged message %s left by a "
                              "stopped process (%s%s)"
                              % (message_id, message_id + NEW,
                                 "; its content stays, another envelope refers to it" if kept
                                 else " and its content"))

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
        spool_files.log_event("warning", "spool: %s: claim of a stopped process released" % (message_id + BUSY))

    # -- deleting (POP)

    @process.spool_privileged
    def remove_envelope(self, envelope_path, content_path):
        """Deletes an envelope, and its content unless another envelope refers to it."""
        os.unlink(envelope_path)
        if not content_shared(content_path, envelope_path):
            unlink_quietly(content_path)
        debug(os.path.basename(envelope_path), "removed")


def _read_fd(fd, size):
    """The bytes of a file just opened (`size` long by fstat), at most
    SIZE_LIMIT + 1 of them (the parser refuses more).

    Asking for one octet more than `size` reads a file that has not grown
    in one system call: a short read of a regular file is its end.
    """
    chunks = []
    left = SIZE_LIMIT + 1
    want = size + 1
    while left > 0:
        chunk = os.read(fd, min(want, left))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
        if len(chunk) < want:
            break
        want = 65536
    return b"".join(chunks)
