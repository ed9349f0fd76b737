"""The PROXY protocol header (HAProxy's, versions 1 and 2), parsed without sockets.

A load balancer that passes TCP connections on (HAProxy's `send-proxy` and
`send-proxy-v2`, cloud TCP balancers) writes one header before the client's
first octet saying who the client is:

    v1: "PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\\r\\n"  (at most 107 octets)
    v2: a 12-octet signature, version and command, family, length, then the
        addresses and optional TLVs (ignored here)

`Parser` takes the header in pieces as they arrive and never takes an octet
past its end, so what follows (a TLS ClientHello, or nothing until the
greeting) stays in the socket for the session. `Parser.wanted()` says how
many octets may be peeked at; `feed(data)` says how many of them belong to
the header. A `LOCAL` (v2) or `UNKNOWN` (v1) header, or one for a unix
socket, names no client: the connection's own addresses stand (the
balancer's health checks use it).
"""

import ipaddress
import struct

# The longest v1 line, CRLF included (the specification's worst case).
V1_MAX = 107
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
# Address block sizes of the v2 families whose addresses are used.
_V2_INET = {0x11: (4, 12), 0x21: (16, 36)}
# Stream families whose addresses are not IP ones: the connection's own stand.
_V2_OTHER = (0x00, 0x31)


class HeaderError(ValueError):
    """The octets are not a valid PROXY header; the message says why, in a few words."""


class Header:
    """A parsed header: `version` (1 or 2), `source` and `destination` as
    (ip, port), or both None when the header names no client."""

    __slots__ = ("version", "source", "destination")

    def __init__(self, version, source=None, destination=None):
        self.version = version
        self.source = source
        self.destination = destination

    def __repr__(self):
        return "Header(%d, %r, %r)" % (self.version, self.source, self.destination)


class Parser:
    """Reads one header from octets given in pieces (see the module docstring).

    `header` is the Header once `feed` has completed it; `feed` raises
    HeaderError as soon as the octets so far cannot begin a valid header.
    """

    def __init__(self):
        self._buf = bytearray()
        self._version = None
        self._total = None      # v2: the header's full length, once known
        self.header = None

    def wanted(self):
        """Octets that may be looked at next without passing the end of the header."""
        if self._version == 2:
            end = self._total if self._total is not None else V2_FIXED
            return end - len(self._buf)
        return V1_MAX - len(self._buf)

    def started(self):
        """True once part of the header has been taken."""
        return bool(self._buf)

    def feed(self, data):
        """Takes the header's octets from the start of `data`; returns how many it took."""
        if self.header is not None:
            return 0
        if self._version is None:
            # The first octet tells the versions apart.
            first = data[:1]
            if first not in (b"P", b"\r"):
                raise HeaderError("not a PROXY header")
            self._version = 1 if first == b"P" else 2
        if self._version == 1:
            return self._feed_v1(data)
        return self._feed_v2(data)

    def _feed_v1(self, data):
        room = self.wanted()
        end = data.find(b"\n", 0, room)
        taken = min(len(data), room) if end < 0 else end + 1
        self._buf += data[:taken]
        if not V1_PREFIX.startswith(bytes(self._buf[:len(V1_PREFIX)])):
            raise HeaderError("not a PROXY header")
        if end < 0:
            if len(self._buf) >= V1_MAX:
                raise HeaderError("v1 line longer than %d octets" % V1_MAX)
            return taken
        self.header = parse_v1(bytes(self._buf))
        return taken

    def _feed_v2(self, data):
        taken = min(len(data), self.wanted())
        self._buf += data[:taken]
        if not V2_SIGNATURE.startswith(bytes(self._buf[:len(V2_SIGNATURE)])):
            raise HeaderError("v2 signature is wrong")
        if self._total is None and len(self._buf) >= V2_FIXED:
            _check_v2_fixed(bytes(self._buf[:V2_FIXED]))
            self._total = V2_FIXED + struct.unpack("!H", self._buf[14:16])[0]
        if self._total is not None and len(self._buf) == self._total:
            self.header = parse_v2(bytes(self._buf))
        return taken


def parse_v1(line):
    """The Header of a complete v1 line (CRLF included); raises HeaderError."""
    if len(line) > V1_MAX:
        raise HeaderError("v1 line longer than %d octets" % V1_MAX)
    if not line.endswith(b"\r\n"):
        raise HeaderError("v1 line does not end with CRLF")
    try:
        fields = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise HeaderError("v1 line is not ASCII") from None
    if fields[0] != "PROXY" or len(fields) < 2:
        raise HeaderError("not a PROXY header")
    protocol = fields[1]
    if protocol == "UNKNOWN":
        return Header(1)
    if protocol not in ("TCP4", "TCP6"):
        raise HeaderError("v1 protocol %s is not TCP4, TCP6 or UNKNOWN" % _shown(protocol))
    if len(fields) != 6:
        raise HeaderError("v1 line needs four fields after %s" % protocol)
    version = 4 if protocol == "TCP4" else 6
    source = (_v1_address(fields[2], version), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], version), _v1_port(fields[5]))
    return Header(1, source, destination)


def _v1_address(text, version):
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None or address.version != version or "%" in text:
        raise HeaderError("v1 address %s is not IPv%d" % (_shown(text), version))
    return str(address)


def _v1_port(text):
    if not (text.isdigit() and text.isascii() and len(text) <= 5 and int(text) <= 65535):
        raise HeaderError("v1 port %s is not a number from 0 to 65535" % _shown(text))
    return int(text)


def _check_v2_fixed(fixed):
    """Checks the version and command octet and the family octet of a v2 header."""
    version, command = fixed[12] >> 4, fixed[12] & 0x0F
    if version != 2:
        raise HeaderError("v2 version %d is not 2" % version)
    if command not in (0, 1):
        raise HeaderError("v2 command %d is neither LOCAL nor PROXY" % command)
    family = fixed[13]
    if command == 1 and family not in _V2_INET and family not in _V2_OTHER:
        raise HeaderError("v2 family 0x%02x is not a stream one" % family)


def parse_v2(data):
    """The Header of a complete v2 header (signature to the end of its TLVs)."""
    if not data.startswith(V2_SIGNATURE):
        raise HeaderError("v2 signature is wrong")
    if len(data) < V2_FIXED:
        raise HeaderError("v2 header shorter than %d octets" % V2_FIXED)
    _check_v2_fixed(data[:V2_FIXED])
    length = struct.unpack("!H", data[14:16])[0]
    if len(data) != V2_FIXED + length:
        raise HeaderError("v2 header length %d does not match its %d octets"
                          % (length, len(data) - V2_FIXED))
    family = data[13]
    if data[12] & 0x0F == 0 or family in _V2_OTHER:
        return Header(2)
    size, block = _V2_INET[family]
    if length < block:
        raise HeaderError("v2 address block truncated (%d octets, %s needs %d)"
                          % (length, "TCP4" if size == 4 else "TCP6", block))
    body = data[V2_FIXED:]
    src = ipaddress.ip_address(bytes(body[:size]))
    dst = ipaddress.ip_address(bytes(body[size:2 * size]))
    sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
    return Header(2, (str(src), sport), (str(dst), dport))


def _shown(text):
    """A field as a log line may show it: short, printable."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return repr(text[:40])
