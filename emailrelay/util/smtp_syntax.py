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


def parse_path(text, allow_empty, strict=False):
    """Splits `<path> params` (RFC 5321 4.1.2) into (address, params-text).

    With `strict` the angle brackets are required (E-MailRelay's
    strictparsing); without, a bare `user@domain` is accepted. Strips a
    source route and honours quoted local parts. Raises ValueError, with
    E-MailRelay's wording, on bad syntax or control characters, which never
    reach filters or verifiers.
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
            raise ValueError("missing or invalid angle brackets in mailbox name")
        address, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(" "):
            raise ValueError("invalid angle brackets")
    elif strict:
        raise ValueError("missing or invalid angle brackets in mailbox name")
    else:
        address, _, rest = text.partition(" ")
    if address.startswith("@"):
        # A source route (<@a,@b:user@host>) is ignored, as RFC 5321 C says.
        if ":" not in address:
            raise ValueError("invalid source route in mailbox name")
        address = address.split(":", 1)[1]
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        raise ValueError("invalid character in mailbox name")
    if not address and not allow_empty:
        raise ValueError("empty address")
    return address, rest.strip(" ")


def to_alabels(address):
    """The address with a non-ASCII domain part as IDNA A-labels (`xn--...`).

    The local part is kept as it is (RFC 6531 allows UTF-8 there); an
    address literal or an ASCII domain is unchanged. Raises ValueError for a
    domain the `idna` codec cannot encode.
    """
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii() or domain.startswith("["):
        return address
    try:
        return local + "@" + domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("invalid domain name") from None


def parse_params(text):
    """Splits ESMTP parameters into a dict of upper-case keyword -> value (or None)."""
    params = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        params[key.upper()] = value if eq else None
    return params
