"""SMTP server controls from ZMailer's smtpserver: values and pure helpers.

What the option parser checks (`parse_test_address`, `parse_max_load`,
`parse_tarpit`, `check_greeting`) and what a session uses: `valid_helo`
(--helo-check), `expand_greeting` (--greeting) and `Tarpit` (--tarpit, one
per session). Util layer: no I/O, no imports from the package. The parts
that need the system (the load average, the help-text file) are in
`smtp_policy`.
"""

import ipaddress
import re

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
# ZMailer's hdr220 macros. %I is "+IDENT" when smtpserver looked the
# client up with RFC 1413 ident and %X its translation-table name: this
# server does neither, so both expand to nothing (a greeting copied from a
# ZMailer configuration still reads right).
_MACROS = {"H", "V", "T", "I", "X", "%"}


def _shown(text):
    """`text` for an error message: as it is when printable, else quoted."""
    return text if text.isprintable() else repr(text)


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
        raise ValueError("invalid address literal %s" % _shown(text))
    return str(addr)


def parse_max_load(text):
    """The --max-load threshold as a float >= 0; raises ValueError."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError("invalid load average %s" % _shown(text))
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
                         "(and a multiplier) >= 0, not %s" % _shown(text))
    return tuple(values)


def check_greeting(text):
    """Raises ValueError for a greeting line with an unknown macro or control character."""
    if not text.isprintable():
        raise ValueError("the text must be printable, on one line")
    for match in re.finditer(r"%(.?)", text):
        if match.group(1) not in _MACROS:
            raise ValueError("unknown macro %%%s (expected %%H, %%V, %%T, %%I, %%X or %%%%)"
                             % _shown(match.group(1)))


def expand_greeting(text, domain, version, now):
    """`text` with %H, %V, %T, %I, %X and %% replaced; `now` is the %T time text."""
    values = {"H": domain, "V": version, "T": now, "I": "", "X": "", "%": "%"}
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
