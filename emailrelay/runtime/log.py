"""Logging to the standard error stream (or a log file) and to syslog.

Call `configure(cfg)` once at start-up; before that, warnings and errors go
to stderr. Then `error()`, `warning()`, `info()`, `verbose()` and `debug()`
from any thread. Lines look like E-MailRelay's:

    emailrelay: [20240131.142501.123: ]info: [1.2.3.4:5678: ]text

`verbose` lines are written as `info`. What is written:

- errors and warnings: always;
- info: with --log (or --debug);
- verbose: with --log --verbose (or --debug);
- debug: with --debug; these lines may show passwords and message content.

Destinations: stderr, or the --log-file instead (`%d` in its name becomes
YYYYMMDD and a new file starts when the local date changes); stderr output
stops after `close_stderr()` (--close-stderr), a log file is not affected.
Syslog (facility mail unless --syslog=<facility>) gets the same lines unless
--no-syslog, which --syslog overrides. `configure` opens syslog at once (so
nothing is imported after --user drops root) and says once on stderr when
the host has no syslog socket and no --log-file keeps the lines instead.
When stderr is systemd's journal (a unit's StandardError=journal, named by
JOURNAL_STREAM) and syslog is on, lines go to syslog only: the journal
gets syslog lines too, and writing both would show every line twice.

`startup_error()` is for errors that stop the program before it runs: they
also go to stderr, without a timestamp, even with --log-file.

After --user, a log file is reopened (SIGHUP, a new day's name) in a root
window (the `root_window` given to `configure`: `process.privileged`, so
that this module, which `process` logs through, does not import it), and
a file it creates gets the owner, group and mode of the file first opened
at start-up; a log file that cannot be reopened is reported on stderr and
syslog.

Every message is sanitised before it is written (see `sanitise`), so text
from the network cannot forge log lines or send escape sequences to a
terminal. The caller never has to remember: modules may still call
`sanitise` themselves, it is idempotent.
"""

import contextlib
import os
import stat
import sys
import syslog
import threading
import time


_LEVELS = {"error": 0, "warning": 1, "info": 2, "verbose": 3, "debug": 4}
_SYSLOG_PRIORITY = {"error": "LOG_ERR", "warning": "LOG_WARNING", "info": "LOG_INFO",
                    "verbose": "LOG_INFO", "debug": "LOG_DEBUG"}

# Characters replaced by sanitise(): C0 and C1 controls, DEL, and the Unicode
# line/paragraph separators and bidirectional overrides that can make a log
# line display differently from what it holds.
_UNSAFE = set(range(0x00, 0x20)) | set(range(0x7f, 0xa0)) | {0x2028, 0x2029} \
    | set(range(0x202a, 0x202f)) | set(range(0x2066, 0x206a))
_TRANSLATE = {c: ("\\x%02x" % c if c < 0x100 else "\\u%04x" % c) for c in _UNSAFE}

# The clock, replaceable by tests that need another day.
now = time.time


def sanitise(text):
    """Returns `text` made safe for one log line.

    Control characters (including CR, LF, TAB and the ESC that starts ANSI
    escape sequences), DEL, C1 controls and Unicode separators/bidi overrides
    become `\\xNN` or `\\uNNNN`; bytes are decoded as UTF-8 with bad bytes
    shown as `\\xNN`. The result is printable, and sanitising it again
    changes nothing. It is for reading, not a reversible encoding.
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "backslashreplace")
    elif not isinstance(text, str):
        text = str(text)
    # Printable ASCII is all that _TRANSLATE leaves alone in that range, and
    # nearly every line is that: two quick scans instead of translate()'s
    # table look-up for every character (about 3 microseconds a line).
    if text.isascii() and text.isprintable():
        return text
    return text.translate(_TRANSLATE)


class _State:
    """The current configuration; replaced as a whole by configure()."""

    def __init__(self):
        self.max_level = _LEVELS["warning"]
        self.log_time = False
        self.log_address = False
        self.to_stderr = True
        # stderr is the journal, which gets the syslog lines too.
        self.stderr_is_journal = False
        self.file_pattern = None
        self.syslog_facility = None
        self.root_window = contextlib.nullcontext


_lock = threading.RLock()
if hasattr(os, "register_at_fork"):
    # A child forked while another thread writes a line (--workers restarts
    # one from a thread) must not inherit the lock held by a thread it lacks.
    os.register_at_fork(before=_lock.acquire, after_in_parent=_lock.release,
                        after_in_child=_lock.release)
_state = _State()
_file = None        # the open log file (binary, unbuffered) or None
_file_path = None   # its path, to notice a new day's name
_file_owner = None  # (uid, gid, mode) of the first log file, for files made later
_syslog = None      # the syslog module once opened

# Where syslog(3) delivers on the systems we run on.
SYSLOG_SOCKETS = ("/dev/log", "/var/run/syslog", "/var/run/log")


def configure(cfg, root_window=contextlib.nullcontext):
    """Sets up logging from the options (--log, --verbose, --debug, ...).

    `root_window()` is a context manager in which a log file is opened
    (`process.privileged` in a program that may drop root with --user).
    Opens the log file at once so a bad --log-file path is an error at
    start-up (OSError), not a silent loss of logs later.
    """
    state = _State()
    state.root_window = root_window
    if cfg.debug:
        state.max_level = _LEVELS["debug"]
    elif cfg.log:
        state.max_level = _LEVELS["verbose"] if cfg.verbose else _LEVELS["info"]
    state.log_time = bool(cfg.log_time)
    state.log_address = bool(cfg.log_address)
    state.file_pattern = cfg.log_file or None
    syslog_socket = False
    if cfg.syslog or not cfg.no_syslog:
        state.syslog_facility = cfg.syslog if isinstance(cfg.syslog, str) else "mail"
        syslog_socket = any(_is_socket(p) for p in SYSLOG_SOCKETS)
        state.stderr_is_journal = syslog_socket and _stderr_is_journal()
    global _state, _file_owner
    with _lock:
        _close_file()
        _close_syslog()
        _state = state
        _file_owner = None
        if state.file_pattern:
            _open_file(_path_for(state.file_pattern, time.localtime(now())))
            st = os.fstat(_file.fileno())
            _file_owner = (st.st_uid, st.st_gid, st.st_mode & 0o7777)
        if state.syslog_facility:
            _open_syslog(state.syslog_facility)
    if state.syslog_facility and not syslog_socket and not state.file_pattern:
        _write_stderr("emailrelay: warning: no syslog socket (%s): syslog lines are lost; "
                      "use --log-file, or --no-syslog to stop this warning\n" % SYSLOG_SOCKETS[0])


def _stderr_is_journal():
    """True when stderr is the journal stream systemd names in JOURNAL_STREAM ("dev:inode")."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def _is_socket(path):
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def reopen():
    """Reopens the log file now (SIGHUP, logrotate); returns False on failure.

    A failure is reported on stderr and syslog, and the next line tries
    again.
    """
    with _lock:
        _close_file()
        pattern = _state.file_pattern
        if not pattern:
            return True
        path = _path_for(pattern, time.localtime(now()))
        try:
            _open_file(path)
        except OSError as e:
            _report_file_error(path, e, None)
            return False
        return True


def close_stderr():
    """Stops logging to stderr and points file descriptor 2 at /dev/null.

    Used for --close-stderr once start-up is over; a log file carries on.
    """
    with _lock:
        _state.to_stderr = False
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(fd, 2)
        finally:
            os.close(fd)


def debug_enabled():
    """True when debug lines are written, so callers can skip costly formatting."""
    return _state.max_level >= _LEVELS["debug"]


def verbose_enabled():
    """True when verbose lines are written."""
    return _state.max_level >= _LEVELS["verbose"]


def error(msg, peer=None):
    """Logs an error."""
    _emit("error", msg, peer)


def warning(msg, peer=None):
    """Logs a warning."""
    _emit("warning", msg, peer)


def info(msg, peer=None):
    """Logs an information line (with --log)."""
    _emit("info", msg, peer)


def verbose(msg, peer=None):
    """Logs a detail line (with --log --verbose); it is written as `info`."""
    _emit("verbose", msg, peer)


def debug(msg, peer=None):
    """Logs a debug line (with --debug)."""
    _emit("debug", msg, peer)


def _path_for(pattern, local_time):
    return pattern.replace("%d", time.strftime("%Y%m%d", local_time))


def _open_file(path):
    global _file, _file_path
    # Appending whole lines with one unbuffered write keeps lines intact
    # even when another process logs to the same file.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    with _state.root_window():
        if _file_owner is None:
            fd = os.open(path, flags, 0o666)
        else:
            uid, gid, mode = _file_owner
            try:
                fd = os.open(path, flags | os.O_EXCL, mode)
                try:
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, mode)
                except OSError:
                    os.close(fd)
                    raise
            except FileExistsError:
                fd = os.open(path, flags, mode)
    _file = os.fdopen(fd, "ab", buffering=0)
    _file_path = path


def _close_file():
    global _file, _file_path
    if _file is not None:
        try:
            _file.close()
        except OSError:
            pass
    _file = None
    _file_path = None


def _open_syslog(facility):
    global _syslog
    syslog.openlog("emailrelay", syslog.LOG_PID,
                   getattr(syslog, "LOG_" + facility.upper(), syslog.LOG_MAIL))
    _syslog = syslog


def _close_syslog():
    global _syslog
    if _syslog is not None:
        _syslog.closelog()
    _syslog = None


def startup_error(msg):
    """Logs an error that stops start-up: also on stderr, plain, even with --log-file."""
    _emit("error", msg, None, plain_stderr=True)


def _emit(level, msg, peer, plain_stderr=False):
    state = _state
    if _LEVELS[level] > state.max_level:
        return
    text = sanitise(msg)
    if peer is not None and state.log_address:
        text = "%s: %s" % (sanitise(peer), text)
    word = "info" if level == "verbose" else level
    t = now()
    local_time = time.localtime(t)
    if state.log_time:
        stamp = "%s.%03d: " % (time.strftime("%Y%m%d.%H%M%S", local_time),
                               int(t * 1000) % 1000)
    else:
        stamp = ""
    line = "emailrelay: %s%s: %s\n" % (stamp, word, text)
    with _lock:
        if plain_stderr and not state.stderr_is_journal:
            _write_stderr("emailrelay: %s: %s\n" % (word, text))
        if state.file_pattern:
            _write_file(state.file_pattern, local_time, line)
        elif state.to_stderr and not plain_stderr and not state.stderr_is_journal:
            _write_stderr(line)
        if state.syslog_facility:
            _write_syslog(state.syslog_facility, level, "%s: %s" % (word, text))


def _write_file(pattern, local_time, line):
    path = _path_for(pattern, local_time) if "%d" in pattern else pattern
    try:
        if _file is None or path != _file_path:
            _close_file()
            _open_file(path)
        _file.write(line.encode("utf-8", "backslashreplace"))
    except OSError as e:
        _report_file_error(path, e, line)


def _report_file_error(path, e, line):
    """The log file cannot be opened or written: say so loudly elsewhere."""
    text = "cannot write log file %s: %s" % (sanitise(path), e.strerror or e)
    if _state.to_stderr and not _state.stderr_is_journal:
        _write_stderr("emailrelay: error: %s\n" % text)
        if line is not None:
            _write_stderr(line)
    if _state.syslog_facility:
        _write_syslog(_state.syslog_facility, "error", "error: " + text)


def _write_stderr(line):
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(line)
        stream.flush()
    except (OSError, ValueError):
        pass


def _write_syslog(facility, level, text):
    if _syslog is None:
        _open_syslog(facility)
    _syslog.syslog(getattr(_syslog, _SYSLOG_PRIORITY[level]), text)
