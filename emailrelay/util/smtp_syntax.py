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


_NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")


def _is_xtext(text):
    """True for RFC 3461 xtext: `!`..`~` but `+` and `=`, and `+XX` upper-case hex."""
    i = 0
    while i < len(text):
        c = text[i]
        if c == "+":
            if len(text[i + 1:i + 3]) != 2 or any(h not in "0123456789ABCDEF"
                                                  for h in text[i + 1:i + 3]):
                return False
            i += 3
            continue
        if not "!" <= c <= "~" or c == "=":
            return False
        i += 1
    return True


def dsn_ret(value):
    """The RET= value (RFC 3461 4.3) upper-cased; raises ValueError."""
    word = (value or "").upper()
    if word not in ("FULL", "HDRS"):
        raise ValueError("invalid RET= value")
    return word


def dsn_envid(value):
    """The ENVID= value (RFC 3461 4.4), xtext of at most 100 characters; raises ValueError."""
    if not value or len(value) > 100 or not _is_xtext(value):
        raise ValueError("invalid ENVID= value")
    return value


def dsn_notify(value):
    """The NOTIFY= value (RFC 3461 4.1) upper-cased; raises ValueError.

    NEVER alone, or a comma-separated set of SUCCESS, FAILURE and DELAY.
    """
    words = (value or "").upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    if not all(w in _NOTIFY_WORDS for w in words) or len(set(words)) != len(words):
        raise ValueError("invalid NOTIFY= value")
    return ",".join(words)


def dsn_orcpt(value):
    """The ORCPT= value (RFC 3461 4.2): `addr-type;xtext`; raises ValueError."""
    addr_type, semi, address = (value or "").partition(";")
    if (not semi or not addr_type or not address or len(value) > 500
            or not all(c.isalnum() or c == "-" for c in addr_type) or not addr_type.isascii()
            or not _is_xtext(address)):
        raise ValueError("invalid ORCPT= value")
    return value
