"""RFC 3461 xtext, as used in envelope files and in `AUTH=` parameters.

xtext keeps the printable ASCII characters from `!` to `~` except `+` and
`=`; every other octet is written `+XX` (upper-case hex). Text is handled as
UTF-8; undecodable octets survive a decode/encode round trip (surrogateescape).
"""

_HEX = "0123456789ABCDEF"


def _plain(octet):
    return 33 <= octet <= 126 and octet not in (0x2B, 0x3D)  # '+' and '='


def encode(text):
    """Returns `text` as xtext."""
    out = []
    for octet in text.encode("utf-8", "surrogateescape"):
        if _plain(octet):
            out.append(chr(octet))
        else:
            out.append("+" + _HEX[octet >> 4] + _HEX[octet & 15])
    return "".join(out)


def decode(text):
    """Returns the text that `text` (xtext) encodes.

    Lenient: a `+` not followed by two hex digits is kept as it is, and
    lower-case hex digits are accepted; it never raises.
    """
    raw = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        octet = raw[i]
        if octet == 0x2B and _is_hex(raw[i + 1:i + 3]):
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(octet)
            i += 1
    return out.decode("utf-8", "surrogateescape")


def valid(text):
    """True if `text` is well-formed xtext (what a strict reader accepts)."""
    raw = text.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        octet = raw[i]
        if octet == 0x2B:
            if not _is_upper_hex(raw[i + 1:i + 3]):
                return False
            i += 3
        elif _plain(octet):
            i += 1
        else:
            return False
    return True


def _is_hex(pair):
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def _is_upper_hex(pair):
    return len(pair) == 2 and all(c in b"0123456789ABCDEF" for c in pair)
