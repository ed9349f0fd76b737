"""Process control: daemon, pid file, user switch, umask, signals, systemd.

- `daemonise(pid_file)` detaches from the terminal (double fork); with a pid
  file the original process exits only once the file exists, so init systems
  that read the pid file (systemd `Type=forking`) see the right process.
- `write_pid_file` / `remove_pid_file`.
- `switch_user(name)` drops root privileges for good.
- `NORMAL_UMASK` and `set_umask()` (spool files get mode 0660 from the
  spool module whatever the umask).
- `notify_ready()` tells systemd (`Type=notify`) that start-up is done.
- `Signals` turns SIGTERM/SIGINT and SIGHUP into flags, nothing more.
"""

import os
import signal
import socket
import sys

from . import log

# E-MailRelay runs with a umask of 177 (its spool files get group read/write,
# so a group of users can share the spool: spool.py sets their mode).
NORMAL_UMASK = 0o177


class ProcessError(OSError):
    """A process-control step failed; the message says which and why."""


def set_umask(mask=NORMAL_UMASK):
    """Sets the process umask; returns the previous one."""
    return os.umask(mask)


def daemonise(pid_file=None):
    """Becomes a background daemon; returns in the daemon process only.

    Forks twice with setsid() in between, changes directory to / and points
    stdin and stdout at /dev/null (stderr stays until log.close_stderr()).
    The original process exits: with status 0 once the daemon has written
    `pid_file` (when given), or 1 if the daemon failed before that. Call it
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
            write_pid_file(pid_file)
            os.write(write_fd, b"ok")
    finally:
        os.close(write_fd)


def write_pid_file(path):
    """Writes this process's id to `path` (mode 644), creating its directory.

    The file is written under a temporary name and renamed, so a reader
    never sees it empty. Raises ProcessError.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
    """Removes the pid file if it still holds this process's id."""
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def switch_user(name):
    """When running as root, becomes user `name` (groups, gid, uid) for good.

    Does nothing when not root or when `name` is None or "root". Raises
    ProcessError for an unknown user or a failed switch.
    """
    if os.geteuid() != 0 or not name or name == "root":
        return
    import pwd
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ProcessError("--user: no such user: %s" % log.sanitise(name)) from None
    try:
        os.setgroups([entry.pw_gid])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as e:
        raise ProcessError("cannot switch to user %s: %s" % (name, e.strerror or e)) from None
    log.verbose("switched to user %s (uid %d)" % (name, entry.pw_uid))


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
