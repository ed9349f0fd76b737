"""SMTP server controls from ZMailer's smtpserver: values and small helpers.

What the option parser checks (`parse_test_address`, `parse_max_load`,
`parse_tarpit`, `check_greeting`) and what a session uses: `valid_helo`
(--helo-check), `expand_greeting` (--greeting), `load_help_text`
(--help-text), `Tarpit` (--tarpit, one per session) and `LoadGuard`
(--max-load, one per process). Nothing here touches a socket or the spool.
"""

import ipaddress
import os
import re
import threading

from . import log

HELP_LINE_LIMIT = 500       # keeps each 214 line inside RFC 5321's 512 octets
HELP_LINES_LIMIT = 100
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_MACROS = {"H", "V", "T", "%"}


def parse_test_address(text):
    """The IP address in an address literal such as `[1.2.3.4]` or `[IPv6:::1]`.

    ZMailer's `[ipv6.hhhh:...]` spelling is accepted too. Raises ValueError
    for anything that is not a bracketed IPv4 or IPv6 literal.
    """
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError("give an address literal in brackets, such as [192.0.2.1] "
                         "or [IPv6:2001:db8::1]")
    inner = text[1:-1]
    if inner[:5].lower() in ("ipv6:", "ipv6."):
        version, inner = 6, inner[5:]
    else:
        version = 4
    try:
        addr = ipaddress.ip_address(inner)
    except ValueError:
        addr = None
    if addr is None or addr.version != version:
        raise ValueError("invalid address literal %s" % log.sanitise(text))
    return str(addr)


def parse_max_load(text):
    """The --max-load threshold as a float >= 0; raises ValueError."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError("invalid load average %s" % log.sanitise(text))
    return value


def parse_tarpit(text):
    """(initial, exponent, limit) from `initial,exponent,limit`; raises ValueError."""
    parts = text.split(",")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = -1.0
        if not 0 <= value < float("inf"):
            values = None
            break
        values.append(value)
    if values is None or len(values) != 3:
        raise ValueError("expected <initial>,<exponent>,<limit> as numbers of seconds "
                         "(and a multiplier) >= 0, not %s" % log.sanitise(text))
    return tuple(values)


def check_greeting(text):
    """Raises ValueError for a greeting line with an unknown macro or control character."""
    if not text.isprintable():
        raise ValueError("the text must be printable, on one line")
    for match in re.finditer(r"%(.?)", text):
        if match.group(1) not in _MACROS:
            raise ValueError("unknown macro %%%s (expected %%H, %%V, %%T or %%%%)"
                             % log.sanitise(match.group(1)))


def expand_greeting(text, domain, version, now):
    """`text` with %H, %V, %T and %% replaced; `now` is the %T time text."""
    values = {"H": domain, "V": version, "T": now, "%": "%"}
    return re.sub(r"%(.)", lambda m: values[m.group(1)], text)


def valid_helo(arg):
    """True when `arg` is a syntactically valid domain or IPv4/IPv6 address literal."""
    if arg.startswith("["):
        try:
            parse_test_address(arg)
        except ValueError:
            return False
        return True
    if not arg.isascii():
        try:
            arg = arg.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    if len(arg) > 253:
        return False
    labels = arg.split(".")
    if all(label.isdigit() for label in labels):
        return False     # a bare IP address must be written as a literal
    return all(_LABEL.match(label) for label in labels)


def load_help_text(path):
    """The lines of a --help-text file; raises ValueError saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError("cannot read %s: %s" % (path, getattr(e, "strerror", None) or e)) from None
    if len(lines) > HELP_LINES_LIMIT:
        raise ValueError("%s: more than %d lines" % (path, HELP_LINES_LIMIT))
    result = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip()
        if not line.isprintable() or len(line) > HELP_LINE_LIMIT:
            raise ValueError("%s:%d: a line must be printable text of at most %d characters"
                             % (path, number, HELP_LINE_LIMIT))
        result.append(line)
    return result


class Tarpit:
    """The delays before one session's error replies (--tarpit).

    `next_delay()` gives the seconds to wait before the next 4xx/5xx reply:
    `initial` first, then `prev + prev * exponent`, at most `limit`. One
    object per session; it holds no lock, so waiting blocks nobody else.
    """

    def __init__(self, initial, exponent, limit):
        self.exponent = exponent
        self.limit = limit
        self._next = min(initial, limit)

    def next_delay(self):
        delay = self._next
        self._next = min(delay + delay * self.exponent, self.limit)
        return delay


class LoadGuard:
    """--max-load: says whether the machine is too busy for a new session.

    `over()` reads the one-minute load average; the change between "over"
    and "back below" is logged once each time it happens, not per
    connection. Safe to call from every session thread.
    """

    def __init__(self, threshold, getloadavg=os.getloadavg):
        self.threshold = threshold
        self._getloadavg = getloadavg
        self._over = False
        self._lock = threading.Lock()

    def over(self):
        try:
            load = self._getloadavg()[0]
        except OSError:
            return False
        over = load > self.threshold
        with self._lock:
            changed = over != self._over
            self._over = over
        if changed and over:
            log.warning("smtp: load average %.2f is above --max-load %g: refusing connections"
                        % (load, self.threshold))
        elif changed:
            log.info("smtp: load average %.2f is back below --max-load %g: accepting connections"
                     % (load, self.threshold))
        return over
