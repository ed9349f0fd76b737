"""Filters (`--filter`, `--client-filter`) with E-MailRelay's interfaces.

`make(spec, timeout, kind='server')` checks a spec once at
start-up and returns a filter; `run(content_path, envelope_path)` runs it
for one message and returns a FilterResult. Every filter's `run` may be
called from several threads at once.

Specs:
- a program with arguments, split like a command line (a backslash escapes
  a space, quotes group words);
- `exit:N` emulates a program that exits with N;
- `net:<transport-address>` asks a filter daemon (`net:127.0.0.1:10025`,
  `net:[::1]:10025`, `net:filter.example.com:10025`, or a unix socket
  `net:/run/filter.sock`): the content file's full path and a newline go
  out, one line comes back. A line starting with `ok` accepts; any other
  line rejects, the text before a TAB being the response for the SMTP
  client and the text after it the reason that is logged and, for a client
  filter, kept in the `.bad` envelope (without a TAB the line is both).
  The connection is kept for the next message (see `requestclient`).
- `spam:<transport-address>` asks SpamAssassin's spamd (see `spamc`) and
  rejects what it marks as spam (reason `spam: True ; <score> / <limit>`)
  without changing the content; `spam-edit:<transport-address>` never
  rejects but replaces the content with spamd's processed message.
  `--filter spam-edit:127.0.0.1:783` is the user guide's recipe.

`--filter-timeout` bounds a program's run, and a daemon's connect and
answer. A daemon that is down, refuses, times out or gives no complete line
is a temporary failure (`temporary` is True, `response` 'failed', the
reason such as `response timeout: 127.0.0.1:10025`), which the caller logs
as a warning: the SMTP client gets `452 failed` and nothing is stored; a
client-filtered message stays queued.

A program runs with an argument list (never a shell), the content file path
and then the envelope file path as its last two arguments (E-MailRelay 2.1
and later; scripts that read only `$1` are unaffected); a program given
with arguments of its own gets the content path only, so that the user
guide's `--filter="/usr/bin/spamassassin -e"` scans one message and not
the envelope file as a second one. It runs with an environment
holding only PATH and IFS, stdin and stderr on /dev/null, no other inherited
descriptors, in a session of its own. Its standard output is read (the
first `OUTPUT_LIMIT` characters are kept) for a `<<reason>>` or
`[[reason]]` line. After `timeout` seconds its whole process group is
killed and the message gets a temporary failure; a crash (death by signal)
or a program that cannot be started is a temporary failure too.

Exit codes, as E-MailRelay gives them (100-115 are reserved):

| code   | server filter (`--filter`)     | client filter (`--client-filter`) |
|--------|--------------------------------|-----------------------------------|
| 0, 101 | ok                             | ok                                |
| 1-99   | reject (reason from output)    | fail                              |
| 100    | cancel (filter owns message)   | cancel (skip this message)        |
| 102    | cancel + rescan the spool      | ok + stop scanning                |
| 103    | ok + rescan the spool          | ok                                |
| 104    | reject + rescan the spool      | cancel + stop scanning            |
| 105    | reject ("rejected")            | ok + stop scanning                |
| other  | reject ("rejected")            | fail                              |

A cancelled message is not an error even if its files have gone.
"""

import os
import selectors
import shlex
import signal
import subprocess
import time

from ..runtime import log, process
from . import requestclient, spamc

OUTPUT_LIMIT = 4000
DEFAULT_REASON = "rejected"
FILTER_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


class FilterResult:
    """What a filter run means for the message.

    `ok`: the message goes on. `cancel`: forget the message (not an error,
    `ok` is False). `rescan`: the spool should be rescanned once the message
    is committed (the SMTP session asks the forwarder). `stop`: the forwarder should stop scanning after
    this message. `special` sums these up: 'cancel', 'rescan', 'stop' or None.
    `code` is the exit status (None on timeout, crash or start failure).
    `reason` is text for the SMTP client ('' when ok); `temporary` is True
    for timeouts, crashes and start failures (reply 4xx, not 5xx), and then
    `reason` is for the log and `response` the reply text (E-MailRelay's
    `error` for a program, `failed` for a filter daemon).
    """

    def __init__(self, ok, code=None, reason="", temporary=False, cancel=False, rescan=False,
                 stop=False, response="error"):
        self.ok = ok
        self.code = code
        self.reason = reason
        self.temporary = temporary
        self.response = response
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
    """Runs `argv` as described in the module docstring; returns a ProgramResult.

    With --debug the command line and how it ended are logged.
    """
    result = _run_program(argv, timeout)
    if log.debug_enabled():
        log.debug("ran %s: %s" % (" ".join(argv), "exit %d" % result.code if result.code is not None
                                  else result.error))
    return result


def _run_program(argv, timeout):
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
        # Seed 000: "stop scanning for more spooled messages after
        # processing the current one".
        return FilterResult(True, code, stop=True)
    return FilterResult(False, code, reason)


class Filter:
    """One configured filter; `run` may be called from several threads at once.

    `spec` is the text it was made from; `argv` the program and arguments
    (None for `exit:`).
    """

    def __init__(self, spec, argv, exit_code, timeout, kind):
        self.spec = spec
        self.argv = argv
        self.exit_code = exit_code
        self.timeout = timeout
        self.kind = kind

    def run(self, content_path, envelope_path):
        """Runs the filter for one message; returns a FilterResult."""
        if self.argv is None:
            result = interpret(self.exit_code, "", self.kind)
        else:
            paths = [content_path] if len(self.argv) > 1 else [content_path, envelope_path]
            ran = run_program(self.argv + paths, self.timeout)
            if ran.code is None:
                if ran.error == "timeout":
                    reason = "filter timed out"
                elif ran.error == "crash":
                    reason = "filter crashed"
                else:
                    reason = "filter failed: " + ran.error
                return FilterResult(False, None, reason, temporary=True)
            result = interpret(ran.code, ran.output, self.kind)
        return result


class NetFilter:
    """A `net:` filter: asks a filter daemon about each message."""

    def __init__(self, spec, location, timeout, kind):
        self.spec = spec
        self.kind = kind
        self.client = requestclient.RequestClient(location, timeout)

    def run(self, content_path, envelope_path):
        """Asks the daemon about one message; returns a FilterResult."""
        try:
            answer = self.client.request(os.path.abspath(content_path))
        except requestclient.RequestError as e:
            return FilterResult(False, None, str(e), temporary=True, response="failed")
        if answer.startswith("ok"):
            return FilterResult(True, 0)
        response, tab, detail = answer.partition("\t")
        response = clean_text(response) or DEFAULT_REASON
        detail = clean_text(detail) if tab else response
        log.info("filter %s: rejected: %s" % (self.spec, detail or response))
        return FilterResult(False, None, response if self.kind == "server" else (detail or response))


class SpamFilter:
    """A `spam:` or `spam-edit:` filter: asks SpamAssassin's spamd."""

    def __init__(self, spec, location, timeout, edit, kind):
        self.spec = spec
        self.location = location
        self.timeout = timeout
        self.edit = edit
        self.kind = kind

    def run(self, content_path, envelope_path):
        """Scans one message (and with `edit` rewrites it); returns a FilterResult."""
        try:
            result = spamc.check(self.location, content_path, self.timeout, self.edit)
        except (spamc.SpamError, OSError) as e:
            log.warning("filter %s: spamd interaction failed: %s" % (self.spec, e))
            return FilterResult(False, None, "filter failed: %s" % e, temporary=True)
        if result.skipped:
            log.info("filter %s: message larger than %d octets: passed without a spam check"
                     % (self.spec, spamc.MAX_SIZE))
            return FilterResult(True, 0)
        if result.spam and not self.edit:
            detail = "spam: %s" % result.score
            log.info("filter %s: rejected: %s" % (self.spec, detail))
            return FilterResult(False, None, DEFAULT_REASON if self.kind == "server" else detail)
        return FilterResult(True, 0)


def _location(option, spec, text):
    try:
        return requestclient.Location.parse(text)
    except ValueError as e:
        raise ValueError("%s %s: %s" % (option, spec, e)) from None


def make(spec, timeout, kind="server"):
    """Checks `spec` and returns a filter; raises ValueError.

    `kind` is 'server' (`--filter`) or 'client' (`--client-filter`): the
    special exit codes mean different things for each.
    """
    if kind not in ("server", "client"):
        raise ValueError("unknown filter kind %r" % kind)
    text = spec.strip()
    option = "--filter" if kind == "server" else "--client-filter"
    if text.startswith("net:"):
        return NetFilter(spec, _location(option, spec, text[4:]), timeout, kind)
    if text.startswith("spam:"):
        return SpamFilter(spec, _location(option, spec, text[5:]), timeout, False, kind)
    if text.startswith("spam-edit:"):
        return SpamFilter(spec, _location(option, spec, text[10:]), timeout, True, kind)
    if text.startswith("exit:"):
        number = text[5:].strip()
        if not number.isdigit() or int(number) > 255:
            raise ValueError("%s %s: exit: needs a number from 0 to 255" % (option, spec))
        return Filter(spec, None, int(number), timeout, kind)
    return Filter(spec, split_command(text), None, timeout, kind)
