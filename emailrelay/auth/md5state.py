"""MD5 with its internal state exposed, for E-MailRelay's hashed secrets.

E-MailRelay's `emailrelay-passwd` stores a password as the two HMAC-MD5
intermediate states (RFC 2104): the MD5 state after one 64-byte block of
`key XOR 0x36` (inner) and after one block of `key XOR 0x5c` (outer). The
state is four 32-bit words, written little-endian, inner then outer: 32
bytes, shown in base64. From those states a server can answer CRAM-MD5
(RFC 2195) without knowing the password. `hashlib` cannot resume from a
state, so the compression function is written out here.

Forms accepted by `decode_state`:
- base64 of the 32 state bytes (what `emailrelay-passwd` prints);
- base64 of a ':' byte followed by the 32 state bytes (44 characters with no
  padding, starting with 'O'; the form in E-MailRelay's own example files);
- eight dot-separated decimal words, inner a.b.c.d then outer a.b.c.d (the
  older "dotted" form that `emailrelay-passwd --dotted` prints).
"""

import base64
import binascii
import hashlib
import math
import struct

_MASK = 0xFFFFFFFF
_INIT = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_T = [int(abs(math.sin(i + 1)) * 2 ** 32) & _MASK for i in range(64)]
_SHIFTS = ([7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 +
           [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4)


class StateError(ValueError):
    """A stored md5 secret that is not in any known form."""


def _rotl(x, n):
    return ((x << n) | (x >> (32 - n))) & _MASK


def compress(state, block):
    """Returns the MD5 state (four ints) after one 64-byte `block` (RFC 1321)."""
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f = (b & c) | (~b & d)
            g = i
        elif i < 32:
            f = (d & b) | (~d & c)
            g = (5 * i + 1) % 16
        elif i < 48:
            f = b ^ c ^ d
            g = (3 * i + 5) % 16
        else:
            f = c ^ (b | (~d & _MASK))
            g = (7 * i) % 16
        f = (f + a + _T[i] + x[g]) & _MASK
        a, d, c = d, c, b
        b = (b + _rotl(f, _SHIFTS[i])) & _MASK
    return tuple((s + t) & _MASK for s, t in zip(state, (a, b, c, d)))


def resume(state, data, prefix_length):
    """Finishes an MD5 digest started elsewhere.

    `state` is the state after `prefix_length` bytes (a multiple of 64) were
    hashed; `data` is the rest of the message. Returns the 16-byte digest,
    the same as hashlib.md5(prefix + data).digest().
    """
    total = prefix_length + len(data)
    padded = data + b"\x80" + b"\x00" * ((55 - total) % 64) + struct.pack("<Q", (total * 8) & ((1 << 64) - 1))
    for i in range(0, len(padded), 64):
        state = compress(state, padded[i:i + 64])
    return struct.pack("<4I", *state)


def hmac_md5_state(password):
    """Returns the 32-byte inner+outer HMAC-MD5 state for `password` (bytes)."""
    key = password if len(password) <= 64 else hashlib.md5(password).digest()
    key = key.ljust(64, b"\x00")
    inner = compress(_INIT, bytes(k ^ 0x36 for k in key))
    outer = compress(_INIT, bytes(k ^ 0x5C for k in key))
    return struct.pack("<8I", *(inner + outer))


def encode_state(password):
    """Returns the base64 text `emailrelay-passwd` prints for `password`.

    `password` may be str (encoded as UTF-8) or bytes.
    """
    if isinstance(password, str):
        password = password.encode("utf-8")
    return base64.b64encode(hmac_md5_state(password)).decode("ascii")


def encode_dotted(password):
    """Returns the older dotted-decimal form of the state for `password`."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    return ".".join(str(w) for w in struct.unpack("<8I", hmac_md5_state(password)))


def decode_state(text):
    """Returns the 32 state bytes from a stored md5 secret.

    Raises StateError when `text` is in none of the forms in the module
    docstring.
    """
    text = text.strip()
    if text.count(".") == 7:
        try:
            words = [int(w) for w in text.split(".")]
        except ValueError:
            raise StateError("invalid dotted md5 secret") from None
        if any(w < 0 or w > _MASK for w in words):
            raise StateError("invalid dotted md5 secret")
        return struct.pack("<8I", *words)
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise StateError("invalid base64 in md5 secret") from None
    if len(raw) == 33 and raw[:1] == b":":
        raw = raw[1:]
    if len(raw) != 32:
        raise StateError("md5 secret has the wrong length (not made by emailrelay-passwd?)")
    return raw


def cram_md5_from_state(state, challenge):
    """Returns the hex HMAC-MD5 of `challenge` (bytes) keyed by a stored state.

    Equal to hmac.new(password, challenge, 'md5').hexdigest() for the
    password that `state` was made from.
    """
    words = struct.unpack("<8I", state)
    inner = resume(words[:4], challenge, 64)
    return binascii.hexlify(resume(words[4:], inner, 64)).decode("ascii")
