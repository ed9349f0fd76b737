"""SMTP command syntax helpers: mailbox paths, ESMTP parameters, dates.

Pure functions used by the SMTP server session; no I/O.
"""

import time

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc5322_date(now=None):
    """The local time as an RFC 5322 date-time, independent of the locale."""
    global _date_cache
    now = int(time.time() if now is None else now)
    second, text = _date_cache
    if second != now:
        text = _format_date(now)
        _date_cache = (now, text)
    return text


# (second, text): a date is formatted once per second (localtime() may look
# at the time zone file each time it is called).
_date_cache = (None, "")


def _format_date(now):
    t = time.localtime(now)
    offset = t.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    return "%s, %02d %s %04d %02d:%02d:%02d %s%02d%02d" % (
        _DAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
        t.tm_hour, t.tm_min, t.tm_sec, sign, offset // 60, offset % 60)


def parse_path(text, allow_empty):
    """Splits `<path> params` (RFC 5321 4.1.2) into (address, params-text).

    Accepts a missing pair of angle brackets, strips a source route, and
    honours quoted local parts. Raises ValueError on bad syntax or control
    characters, which never reach filters or verifiers.
    """
    text = text.lstrip(" ")
    if text.startswith("<"):
        quoted = False
        end = -1
        i = 1
        while i < len(text):
            c = text[i]
            if c == "\\" and quoted:
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == ">" and not quoted:
                end = i
                break
            i += 1
        if end < 0:
            raise ValueError("missing '>'")
        address, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(" "):
            raise ValueError("junk after '>'")
    else:
        address, _, rest = text.partition(" ")
    if address.startswith("@"):
        # A source route (<@a,@b:user@host>) is ignored, as RFC 5321 C says.
        if ":" not in address:
            raise ValueError("bad source route")
        address = address.split(":", 1)[1]
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        raise ValueError("control character in address")
    if not address and not allow_empty:
        raise ValueError("empty address")
    return address, rest.strip(" ")


def parse_params(text):
    """Splits ESMTP parameters into a dict of upper-case keyword -> value (or None)."""
    params = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        params[key.upper()] = value if eq else None
    return params
