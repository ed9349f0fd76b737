"""DNS messages on the wire (RFC 1035), just enough for DNSBL look-ups.

The standard library has no DNS client. `query(name, qtype, qid)` builds a
query packet (recursion desired, one question, class IN);
`parse(data)` reads a response into a `Message` or raises `DnsError` for
anything malformed (truncated, bad labels, compression loops).
`reverse_name(ip)` is the DNSBL form of an address: `4.3.2.1` for
1.2.3.4, reversed nibbles for IPv6.
"""

import ipaddress
import struct

A = 1
AAAA = 28
CLASS_IN = 1

NOERROR = 0
NXDOMAIN = 3


class DnsError(ValueError):
    """A malformed DNS message or name."""


class Message:
    """A parsed DNS message.

    `id`, `qr` (True for a response), `rcode`, `questions` (list of
    (name, type)), `answers` (list of (name, type, text) where text is the
    address for A and AAAA records, else '').
    """

    def __init__(self, id, qr, rcode, questions, answers):
        self.id = id
        self.qr = qr
        self.rcode = rcode
        self.questions = questions
        self.answers = answers

    def addresses(self):
        """The A and AAAA answer addresses."""
        return [text for _, rtype, text in self.answers if rtype in (A, AAAA)]


def encode_name(name):
    """`name` in wire form (length-prefixed labels); raises DnsError."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii", "strict") if label.isascii() else None
        if raw is None or not 0 < len(raw) < 64:
            raise DnsError("invalid name %r" % name)
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise DnsError("name too long: %r" % name)
    return bytes(out)


def query(name, qtype, qid):
    """A query packet for `name` and `qtype` with message id `qid`."""
    header = struct.pack("!HHHHHH", qid & 0xFFFF, 0x0100, 1, 0, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)


def _read_name(data, offset):
    """(name, offset after it), following compression pointers."""
    labels = []
    end = None
    jumps = 0
    while True:
        if offset >= len(data):
            raise DnsError("truncated name")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise DnsError("truncated pointer")
            jumps += 1
            if jumps > 64:
                raise DnsError("compression loop")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length & 0xC0:
            raise DnsError("bad label type")
        offset += 1
        if length == 0:
            break
        if offset + length > len(data):
            raise DnsError("truncated label")
        labels.append(data[offset:offset + length].decode("ascii", "replace"))
        offset += length
    return ".".join(labels), (end if end is not None else offset)


def parse(data):
    """The Message in `data` (bytes); raises DnsError."""
    if len(data) < 12:
        raise DnsError("short message")
    qid, flags, qdcount, ancount, _, _ = struct.unpack("!HHHHHH", data[:12])
    offset = 12
    questions = []
    for _ in range(qdcount):
        name, offset = _read_name(data, offset)
        if offset + 4 > len(data):
            raise DnsError("truncated question")
        qtype, _ = struct.unpack("!HH", data[offset:offset + 4])
        offset += 4
        questions.append((name, qtype))
    answers = []
    for _ in range(ancount):
        name, offset = _read_name(data, offset)
        if offset + 10 > len(data):
            raise DnsError("truncated record")
        rtype, _, _, rdlength = struct.unpack("!HHIH", data[offset:offset + 10])
        offset += 10
        rdata = data[offset:offset + rdlength]
        if len(rdata) != rdlength:
            raise DnsError("truncated record data")
        offset += rdlength
        answers.append((name, rtype, _rdata_text(rtype, rdata)))
    return Message(qid, bool(flags & 0x8000), flags & 0x000F, questions, answers)


def _rdata_text(rtype, rdata):
    if rtype == A:
        if len(rdata) != 4:
            raise DnsError("bad A record")
        return str(ipaddress.IPv4Address(rdata))
    if rtype == AAAA:
        if len(rdata) != 16:
            raise DnsError("bad AAAA record")
        return str(ipaddress.IPv6Address(rdata))
    return ""


def reverse_name(ip):
    """The DNSBL query prefix for an address (without the list's domain)."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))
