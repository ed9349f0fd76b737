"""Process control: daemon, pid file, user switch, umask, signals, systemd.

- `daemonise(pid_file)` detaches from the terminal (double fork); with a pid
  file the original process exits only once the file exists, so init systems
  that read the pid file (systemd `Type=forking`) see the right process.
- `write_pid_file` / `remove_pid_file`.
- `drop_privileges(name)` switches the effective user and group to `name`;
  `privileged()` reclaims root for a short window (see "Privileges" below);
  `child_ids()` makes a child program run with the user's real and
  effective ids; `preflight(name, checks)` runs checks as that user.
- `NORMAL_UMASK` and `set_umask()` (spool files get mode 0660 from the
  spool module whatever the umask).
- `notify_ready()` tells systemd (`Type=notify`) that start-up is done.
- `Signals` turns SIGTERM/SIGINT and SIGHUP into flags, nothing more.
"""

import ctypes
import functools
import os
import platform
import pwd
import signal
import socket
import sys
import threading

from . import log

# E-MailRelay runs with a umask of 177 (its spool files get group read/write,
# so a group of users can share the spool: spool.py sets their mode).
NORMAL_UMASK = 0o177


class ProcessError(OSError):
    """A process-control step failed; the message says which and why."""


def set_umask(mask=NORMAL_UMASK):
    """Sets the process umask; returns the previous one."""
    return os.umask(mask)


def daemonise(pid_file=None, group=None):
    """Becomes a background daemon; returns in the daemon process only.

    Forks twice with setsid() in between, changes directory to / and points
    stdin and stdout at /dev/null (stderr stays until log.close_stderr()).
    The original process exits: with status 0 once the daemon has written
    `pid_file` (when given, with `group` as for write_pid_file), or 1 if the
    daemon failed before that. Call it
    before any thread is started: fork() copies only the calling thread.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        os.waitpid(pid, 0)
        status = 0
        if pid_file:
            with os.fdopen(read_fd, "rb") as pipe:
                # EOF without "ok" means the daemon died before the pid file.
                status = 0 if pipe.read() == b"ok" else 1
        os._exit(status)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    fd = os.open(os.devnull, os.O_RDWR)
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    if fd > 2:
        os.close(fd)
    try:
        if pid_file:
            write_pid_file(pid_file, group)
            os.write(write_fd, b"ok")
    finally:
        os.close(write_fd)


def _make_directories(directory):
    """Creates `directory` and missing parents with mode 0755 whatever the umask."""
    if os.path.isdir(directory):
        return
    previous = os.umask(0o022)
    try:
        os.makedirs(directory, 0o755, exist_ok=True)
    finally:
        os.umask(previous)


def _create_with_group(path, group):
    """Creates `path` for writing; with `group`, under that effective group.

    Switching the effective group (as E-MailRelay does for spool files)
    gives the file that group without chown(), which root may not do
    without CAP_CHOWN when it is not in the group. Call it before threads
    start: the switch is process-wide.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if group is None:
        return os.open(path, flags, 0o644)
    previous = os.getegid()
    os.setegid(group)
    try:
        return os.open(path, flags, 0o644)
    finally:
        os.setegid(previous)


def write_pid_file(path, group=None):
    """Writes this process's id to `path` (mode 644), creating its directory.

    Missing directories are created with mode 0755. With `group` (a gid)
    the file belongs to that group (root and the --user group, as
    E-MailRelay). The file is written under a temporary name and renamed,
    so a reader never sees it empty. Raises ProcessError.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        _make_directories(directory)
        fd = _create_with_group(tmp, group)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, b"%d\n" % os.getpid())
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ProcessError("cannot write pid file %s: %s" % (path, e.strerror or e)) from None


def remove_pid_file(path):
    """Removes the pid file if it still holds this process's id.

    Runs in a root window, so it works after drop_privileges() even when
    only root may write the pid file's directory.
    """
    with privileged():
        try:
            with open(path) as f:
                if f.read().strip() != str(os.getpid()):
                    return
            os.unlink(path)
        except (OSError, ValueError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning("cannot remove pid file %s: %s" % (path, getattr(e, "strerror", None) or e))


# -- privileges
#
# Started as root, the program keeps root as its real and saved user id and
# switches only the effective ids to --user (seed 000, "Security issues"),
# so it can take root back for a moment: to bind, to do spool file i/o, to
# write and remove the pid file, to re-read root-only secrets files and to
# reopen log files.
#
# A window changes the ids of the calling thread only, where the kernel
# allows it: Linux keeps credentials per thread, and it is glibc's seteuid()
# that makes them process-wide, by signalling every other thread and waiting
# for each to switch too (about 150 microseconds a window with a few threads
# asleep, against 4 for the bare system call). The raw setresuid/setresgid
# system calls are used instead, so a window costs two system calls and
# gives root to no other thread. Where their numbers are not known here,
# os.seteuid() is used and a window is process-wide: then windows are
# counted across threads, so the ids go back only when the last one closes.
# Either way windows nest, and are kept short (one spool operation, one
# open()); no thread is started inside one (it would keep root).

# Linux system call numbers of setresuid and setresgid, by machine.
_RES_CALLS = {"x86_64": (117, 119), "aarch64": (147, 149), "riscv64": (147, 149)}


def _thread_calls():
    """(seteuid, setegid) for the calling thread only, or None where not known."""
    if not sys.platform.startswith("linux"):
        return None
    numbers = _RES_CALLS.get(platform.machine())
    if numbers is None:
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    keep = ctypes.c_long(-1)

    def call(number, value):
        if syscall(ctypes.c_long(number), keep, ctypes.c_long(value), keep) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    return (lambda uid: call(numbers[0], uid)), (lambda gid: call(numbers[1], gid))


_ids_lock = threading.Lock()
_user_ids = None      # (uid, gid) once drop_privileges() has switched
_uid_windows = 0      # open process-wide windows, all kinds
_gid_windows = 0      # open process-wide windows that also took the root group back
_per_thread = threading.local()
_THREAD_CALLS = _thread_calls()
# The id switches windows use; one thread's alone when _THREAD_CALLS is known.
_seteuid, _setegid = _THREAD_CALLS or (os.seteuid, os.setegid)


class _Window:
    """A root window: the effective ids are root's while it is open (see above)."""

    def __init__(self, group):
        self._group = group

    def __enter__(self):
        if _user_ids is None:
            return self
        if _THREAD_CALLS is not None:
            counts = _per_thread.__dict__
            if not counts.get("uid"):
                _seteuid(0)
            counts["uid"] = counts.get("uid", 0) + 1
            if self._group:
                if not counts.get("gid"):
                    _setegid(0)
                counts["gid"] = counts.get("gid", 0) + 1
            return self
        global _uid_windows, _gid_windows
        with _ids_lock:
            if _uid_windows == 0:
                _seteuid(0)
            _uid_windows += 1
            if self._group:
                if _gid_windows == 0:
                    _setegid(0)
                _gid_windows += 1
        return self

    def __exit__(self, *exc):
        ids = _user_ids
        if ids is None:
            return False
        if _THREAD_CALLS is not None:
            counts = _per_thread.__dict__
            if self._group:
                counts["gid"] -= 1
                if not counts["gid"]:
                    _setegid(ids[1])
            counts["uid"] -= 1
            if not counts["uid"]:
                _seteuid(ids[0])
            return False
        global _uid_windows, _gid_windows
        with _ids_lock:
            if self._group:
                _gid_windows -= 1
                if _gid_windows == 0:
                    _setegid(ids[1])
            _uid_windows -= 1
            if _uid_windows == 0:
                _seteuid(ids[0])
        return False


_FULL_WINDOW = _Window(group=True)
_SPOOL_WINDOW = _Window(group=False)


def privileged(group=True):
    """A context manager that reclaims root for the `with` block.

    With `group` the effective group goes back to root's as well (pid file,
    secrets, log files); without, only the user id does, so that files
    created in the block belong to root and to the --user group (spool
    files). Does nothing until drop_privileges() has switched; safe from
    any thread and when nested.
    """
    return _FULL_WINDOW if group else _SPOOL_WINDOW


def forked_child():
    """Call first in a child forked while other threads ran: no root window is open here.

    A window that another thread of the parent had open is copied with its
    root effective ids, but not the thread that would have closed it.
    """
    global _ids_lock, _uid_windows, _gid_windows
    _ids_lock = threading.Lock()
    _uid_windows = _gid_windows = 0
    _per_thread.__dict__.clear()
    if _user_ids is not None:
        os.seteuid(0)
        os.setegid(_user_ids[1])
        os.seteuid(_user_ids[0])


def spool_privileged(function):
    """Decorates a spool operation to run in a root window (user id only)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _SPOOL_WINDOW:
            return function(*args, **kwargs)
    return wrapper


def user_entry(name):
    """The pwd entry of --user `name`, or None when no switch is due.

    None when not running as root or when `name` is empty or "root".
    Raises ProcessError for an unknown user.
    """
    if os.geteuid() != 0 or not name or name == "root":
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ProcessError("--user: no such user: %s" % log.sanitise(name)) from None


def _switch_effective(entry):
    os.setgroups([entry.pw_gid])
    os.setegid(entry.pw_gid)
    os.seteuid(entry.pw_uid)


def drop_privileges(name):
    """Switches the effective user and group to --user `name`; returns the entry.

    Real and saved ids stay root's, so privileged() can reclaim root. The
    supplementary groups become the user's group alone. Returns None (and
    does nothing) when no switch is due (see user_entry). Raises
    ProcessError for an unknown user or a failed switch.
    """
    global _user_ids
    entry = user_entry(name)
    if entry is None:
        return None
    try:
        _switch_effective(entry)
    except OSError as e:
        raise ProcessError("cannot switch to user %s: %s" % (name, e.strerror or e)) from None
    _user_ids = (entry.pw_uid, entry.pw_gid)
    return entry


def user_ids():
    """(uid, gid) of --user after drop_privileges(), else None."""
    return _user_ids


def child_ids():
    """Keyword arguments for subprocess.Popen so that a child is never root.

    After drop_privileges() the child's real and effective ids become the
    --user ids before it execs (its supplementary groups are already only
    the user's group); before, or when no switch was due, nothing changes.
    """
    ids = _user_ids
    if ids is None:
        return {}
    uid, gid = ids
    if sys.version_info >= (3, 9):
        return {"user": uid, "group": gid}

    def become_user():
        os.setregid(gid, gid)
        os.setreuid(uid, uid)
    return {"preexec_fn": become_user}


def preflight(name, checks):
    """Runs `checks` in a short-lived child that switched like the daemon will.

    `checks` is a list of callables, each returning None or an error text.
    Returns the first error text, or None. An unexpected exception in a
    check is returned as what it is, never as some other failure. Call it
    before daemonising, so that the error reaches the terminal.
    """
    entry = user_entry(name)
    if entry is None:
        return None
    read_fd, write_fd = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            try:
                _switch_effective(entry)
                error = None
                for check in checks:
                    error = check()
                    if error:
                        break
            except OSError as e:
                error = "as user %s: %s" % (name, e)
            except Exception as e:
                error = "as user %s: %s: %s" % (name, type(e).__name__, e)
            if error:
                os.write(write_fd, error.encode("utf-8", "backslashreplace"))
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        text = pipe.read().decode("utf-8", "replace")
    os.waitpid(pid, 0)
    return text or None


def notify_ready():
    """Sends READY=1 to systemd's $NOTIFY_SOCKET, if set; returns True if sent.

    A name starting with '@' is an abstract socket. Failure is logged as a
    warning, never fatal: the service still runs.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1\nMAINPID=%d\n" % os.getpid(), address)
    except OSError as e:
        log.warning("cannot notify systemd on %s: %s" % (log.sanitise(address),
                                                         e.strerror or e))
        return False
    return True


class Flag:
    """A flag a signal handler may set: setting it only assigns a bool.

    (A threading.Event takes a lock in set(), which a handler interrupting
    the same thread inside wait() could never get.)
    """

    def __init__(self):
        self._value = False

    def set(self):
        self._value = True

    def clear(self):
        self._value = False

    def is_set(self):
        return self._value


class Signals:
    """Installs handlers: SIGTERM/SIGINT set `stop`, SIGHUP sets `hup`.

    Handlers only set the flags; with `wakeup_fd` (a non-blocking socket or
    pipe) each signal also writes a byte there to wake a select loop, which
    then looks at the flags. Create it in the main thread. `restore()` puts
    the previous handlers back.
    """

    def __init__(self, wakeup_fd=None):
        self.stop = Flag()
        self.hup = Flag()
        self._previous = {}
        for sig, handler in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop),
                             (signal.SIGHUP, self._on_hup)):
            self._previous[sig] = signal.signal(sig, handler)
        self._previous_wakeup = None
        if wakeup_fd is not None:
            self._previous_wakeup = signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)

    def _on_stop(self, signum, frame):
        self.stop.set()

    def _on_hup(self, signum, frame):
        self.hup.set()

    def restore(self):
        """Reinstates the handlers and wakeup fd that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous_wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
