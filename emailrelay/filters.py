"""Filter programs (`--filter`, `--client-filter`) with E-MailRelay's interface.

`make(spec, timeout, rescan_cb=None, kind='server')` checks a spec once at
start-up and returns a Filter; `Filter.run(content_path, envelope_path)`
runs it for one message and returns a FilterResult.

Specs: a program with arguments, split like a command line (a backslash
escapes a space, quotes group words); `exit:N` emulates a program that exits
with N. `net:`, `spam:` and `spam-edit:` raise NotImplementedSpec.

The program runs with an argument list (never a shell), the content file
path as its last argument, an environment holding only PATH and IFS, stdin
and stderr on /dev/null, no other inherited descriptors, in a session of its
own. Its standard output is read (the first `OUTPUT_LIMIT` characters are
kept) for a `<<reason>>` or `[[reason]]` line. After `timeout` seconds its
whole process group is killed and the message gets a temporary failure; a
crash (death by signal) or a program that cannot be started is a temporary
failure too.

Exit codes, as E-MailRelay gives them (100-115 are reserved):

| code   | server filter (`--filter`)     | client filter (`--client-filter`) |
|--------|--------------------------------|-----------------------------------|
| 0, 101 | ok                             | ok                                |
| 1-99   | reject (reason from output)    | fail                              |
| 100    | cancel (filter owns message)   | cancel (skip this message)        |
| 102    | cancel + rescan the spool      | ok + stop scanning                |
| 103    | ok + rescan the spool          | ok                                |
| 104    | reject + rescan the spool      | cancel + stop scanning            |
| 105    | reject ("rejected")            | fail + stop scanning              |
| other  | reject ("rejected")            | fail                              |

A cancelled message is not an error even if its files have gone.
"""

import os
import shlex
import time

from . import process

OUTPUT_LIMIT = 4000
DEFAULT_REASON = "rejected"
FILTER_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


class NotImplementedSpec(ValueError):
    """A filter or verifier spec form this version does not implement."""


class FilterResult:
    """What a filter run means for the message.

    `ok`: the message goes on. `cancel`: forget the message (not an error,
    `ok` is False). `rescan`: the spool should be rescanned (`rescan_cb` has
    already been called). `stop`: the forwarder should stop scanning after
    this message. `special` sums these up: 'cancel', 'rescan', 'stop' or None.
    `code` is the exit status (None on timeout, crash or start failure).
    `reason` is text for the SMTP client ('' when ok); `temporary` is True
    for timeouts, crashes and start failures (reply 4xx, not 5xx).
    """

    def __init__(self, ok, code=None, reason="", temporary=False, cancel=False, rescan=False,
                 stop=False):
        self.ok = ok
        self.code = code
        self.reason = reason
        self.temporary = temporary
        self.cancel = cancel
        self.rescan = rescan
        self.stop = stop
        if cancel:
            self.special = "cancel"
        elif rescan:
            self.special = "rescan"
        elif stop:
            self.special = "stop"
        else:
            self.special = None

    def __repr__(self):
        return "FilterResult(ok=%r, code=%r, special=%r, reason=%r, temporary=%r)" % (
            self.ok, self.code, self.special, self.reason, self.temporary)


class ProgramResult:
    """How a program run ended: `code` (exit status or None), `output` (str,
    at most OUTPUT_LIMIT characters), `error` (why there is no code:
    'timeout', 'crash' or a start failure message; '' otherwise)."""

    def __init__(self, code, output="", error=""):
        self.code = code
        self.output = output
        self.error = error


def split_command(spec):
    """Splits a program spec into an argument list; raises ValueError."""
    try:
        argv = shlex.split(spec)
    except ValueError as e:
        raise ValueError("invalid program %r: %s" % (spec, e)) from None
    if not argv:
        raise ValueError("empty program")
    return argv


def run_program(argv, timeout):
    """Runs `argv` as described in the module docstring; returns a ProgramResult."""
    import selectors
    import signal
    import subprocess
    env = {"PATH": FILTER_ENV_PATH, "IFS": " \t\n"}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, close_fds=True,
                                start_new_session=True, **process.child_ids())
    except OSError as e:
        return ProgramResult(None, error="cannot run %s: %s" % (argv[0], e.strerror or e))
    deadline = time.monotonic() + timeout
    chunks = []
    kept = 0
    timed_out = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            # A short wait lets us notice a program that exited while a
            # background child of its own still holds the pipe open.
            if sel.select(min(remaining, 0.1)):
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    break
                if kept < OUTPUT_LIMIT:
                    chunks.append(data[:OUTPUT_LIMIT - kept])
                    kept += len(chunks[-1])
            elif proc.poll() is not None:
                break
    proc.stdout.close()
    if not timed_out:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        return ProgramResult(None, error="timeout")
    output = b"".join(chunks).decode("utf-8", "replace")
    if proc.returncode < 0:
        return ProgramResult(None, output, error="crash")
    return ProgramResult(proc.returncode, output)


def clean_text(text):
    """`text` with control characters (CR, LF, ...) replaced, for a reply line."""
    return "".join(c if c.isprintable() else " " for c in text).strip()


def find_reason(output):
    """The text of the first `<<text>>` or `[[text]]` output line, or ''."""
    for line in output.split("\n"):
        line = line.strip()
        for start, end in (("<<", ">>"), ("[[", "]]")):
            if line.startswith(start) and end in line[2:]:
                return clean_text(line[2:line.index(end, 2)])
    return ""


def interpret(code, output, kind="server"):
    """The FilterResult for exit status `code` and program `output`."""
    server = kind == "server"
    reason = find_reason(output) or DEFAULT_REASON
    if code in (0, 101):
        return FilterResult(True, code)
    if code == 100:
        return FilterResult(False, code, cancel=True)
    if code == 102:
        return FilterResult(False, code, cancel=True, rescan=True) if server else \
            FilterResult(True, code, stop=True)
    if code == 103:
        return FilterResult(True, code, rescan=server)
    if code == 104:
        return FilterResult(False, code, reason, rescan=True) if server else \
            FilterResult(False, code, cancel=True, stop=True)
    if code == 105 and not server:
        return FilterResult(False, code, reason, stop=True)
    return FilterResult(False, code, reason)


class Filter:
    """One configured filter; `run` may be called from several threads at once.

    `spec` is the text it was made from; `argv` the program and arguments
    (None for `exit:`).
    """

    def __init__(self, spec, argv, exit_code, timeout, rescan_cb, kind):
        self.spec = spec
        self.argv = argv
        self.exit_code = exit_code
        self.timeout = timeout
        self.rescan_cb = rescan_cb
        self.kind = kind

    def run(self, content_path, envelope_path=None):
        """Runs the filter for one message; returns a FilterResult.

        Only `content_path` is passed to the program (E-MailRelay's
        interface); `envelope_path` is accepted for callers' convenience.
        """
        if self.argv is None:
            result = interpret(self.exit_code, "", self.kind)
        else:
            ran = run_program(self.argv + [content_path], self.timeout)
            if ran.code is None:
                if ran.error == "timeout":
                    reason = "filter timed out"
                elif ran.error == "crash":
                    reason = "filter crashed"
                else:
                    reason = "filter failed: " + ran.error
                return FilterResult(False, None, reason, temporary=True)
            result = interpret(ran.code, ran.output, self.kind)
        if result.rescan and self.rescan_cb is not None:
            self.rescan_cb()
        return result


def make(spec, timeout, rescan_cb=None, kind="server"):
    """Checks `spec` and returns a Filter; raises ValueError or NotImplementedSpec.

    `kind` is 'server' (`--filter`) or 'client' (`--client-filter`): the
    special exit codes mean different things for each. `rescan_cb()` is
    called after a run that asks for a spool rescan.
    """
    if kind not in ("server", "client"):
        raise ValueError("unknown filter kind %r" % kind)
    text = spec.strip()
    option = "--filter" if kind == "server" else "--client-filter"
    for prefix in ("net:", "spam:", "spam-edit:"):
        if text.startswith(prefix):
            raise NotImplementedSpec("%s %s: the %s form is not implemented in this version"
                                     % (option, spec, prefix))
    if text.startswith("exit:"):
        number = text[5:].strip()
        if not number.isdigit() or int(number) > 255:
            raise ValueError("%s %s: exit: needs a number from 0 to 255" % (option, spec))
        return Filter(spec, None, int(number), timeout, rescan_cb, kind)
    return Filter(spec, split_command(text), None, timeout, rescan_cb, kind)
