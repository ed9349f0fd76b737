"""PROXY protocol headers (v1 and v2) parsed without sockets: emailrelay.net.proxy_header.

The v2 headers here are built by hand from the specification's layout
(signature, version/command, family, length, addresses, ports, TLVs), and
the v1 lines are HAProxy's own form.
"""

import ipaddress
import struct

import pytest

from emailrelay.net import proxy_header
from emailrelay.net.proxy_header import HeaderError, Parser

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(source, destination, command=0x21, family=None, tlvs=b"", length=None):
    """A v2 header for TCP over IPv4 or IPv6 (a test's own writer)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if family is None:
        family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return SIG + struct.pack("!BBH", command, family,
                             len(block) if length is None else length) + block


def parse_all(data, pieces=1):
    """Feeds `data` in `pieces` parts as a socket reader would; returns (header, octets taken)."""
    parser = Parser()
    taken = 0
    size = max(1, len(data) // pieces)
    while parser.header is None:
        chunk = data[taken:taken + min(size, parser.wanted())]
        if not chunk:
            return None, taken
        taken += parser.feed(chunk)
    return parser.header, taken


@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_v1_tcp4_gives_client_and_destination(pieces):
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n"
    header, taken = parse_all(line + b"EHLO x\r\n", pieces)
    assert (header.version, header.source, header.destination) == \
        (1, ("203.0.113.7", 40000), ("192.0.2.1", 25))
    assert taken == len(line)


def test_v1_tcp6_and_unknown():
    header = proxy_header.parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 587\r\n")
    assert header.source == ("2001:db8::7", 40000) and header.destination == ("2001:db8::1", 587)
    unknown = proxy_header.parse_v1(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n")
    assert unknown.source is None and unknown.destination is None


def test_v1_never_takes_octets_past_the_line():
    parser = Parser()
    line = b"PROXY TCP4 198.51.100.2 192.0.2.1 1 2\r\n"
    assert parser.feed(line + b"\x16\x03\x01") == len(line)
    assert parser.header.source == ("198.51.100.2", 1)
    assert parser.feed(b"more") == 0


def test_v1_longest_line_is_accepted_and_one_more_octet_is_refused():
    base = b"PROXY UNKNOWN "
    line = base + b"x" * (proxy_header.V1_MAX - len(base) - 2) + b"\r\n"
    assert len(line) == 107
    assert parse_all(line)[0].source is None
    longer = base + b"x" * (proxy_header.V1_MAX - len(base) - 1) + b"\r\n"
    with pytest.raises(HeaderError, match="longer than 107"):
        parse_all(longer)
    # Refused as soon as 107 octets have come without a line end.
    parser = Parser()
    parser.feed(b"PROXY TCP4 " + b"1" * 90)
    with pytest.raises(HeaderError, match="longer than 107"):
        parser.feed(b"2" * 40)


@pytest.mark.parametrize("line, why", [
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 40000\r\n", "four fields"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25 6\r\n", "four fields"),
    (b"PROXY TCP4 2001:db8::7 192.0.2.1 40000 25\r\n", "not IPv4"),
    (b"PROXY TCP6 203.0.113.7 2001:db8::1 40000 25\r\n", "not IPv6"),
    (b"PROXY TCP4 203.0.113.777 192.0.2.1 40000 25\r\n", "not IPv4"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 25\r\n", "port"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 -1 25\r\n", "port"),
    (b"PROXY UDP4 203.0.113.7 192.0.2.1 40000 25\r\n", "not TCP4"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\n", "CRLF"),
    (b"PROXY\r\n", "not a PROXY header"),
    (b"PROXX TCP4\r\n", "not a PROXY header"),
    (b"EHLO client.test\r\n", "not a PROXY header"),
])
def test_malformed_v1_lines_are_refused(line, why):
    with pytest.raises(HeaderError, match=why):
        parse_all(line)


@pytest.mark.parametrize("pieces", [1, 2, 1000])
def test_v2_tcp4_with_tlvs(pieces):
    tlvs = b"\x05\x00\x03abc"          # PP2_TYPE_UNIQUE_ID, skipped
    data = v2(("203.0.113.7", 40000), ("192.0.2.1", 25), tlvs=tlvs)
    header, taken = parse_all(data + b"\x16\x03\x01\x02\x00", pieces)
    assert (header.version, header.source, header.destination) == \
        (2, ("203.0.113.7", 40000), ("192.0.2.1", 25))
    assert taken == len(data)


def test_v2_tcp6_local_and_unix():
    header, _ = parse_all(v2(("2001:db8::7", 1), ("2001:db8::1", 2)))
    assert header.source == ("2001:db8::7", 1)
    local = SIG + b"\x20\x00\x00\x00"
    header, taken = parse_all(local + b"EHLO")
    assert (header.version, header.source, taken) == (2, None, 16)
    unix = SIG + b"\x21\x31" + struct.pack("!H", 216) + bytes(216)
    assert parse_all(unix)[0].source is None


@pytest.mark.parametrize("data, why", [
    (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12), "signature"),
    (b"\r\n\r\n\x01", "signature"),
    (SIG + b"\x11\x11\x00\x0c" + bytes(12), "version 1 is not 2"),
    (SIG + b"\x22\x11\x00\x0c" + bytes(12), "command 2"),
    (SIG + b"\x21\x12\x00\x0c" + bytes(12), "not a stream"),
    (SIG + b"\x21\x11\x00\x08" + bytes(8), "truncated"),
    (SIG + b"\x21\x21\x00\x0c" + bytes(12), "truncated"),
])
def test_malformed_v2_headers_are_refused(data, why):
    with pytest.raises(HeaderError, match=why):
        parse_all(data)


def test_v2_is_refused_at_the_fixed_part_before_its_address_block():
    parser = Parser()
    with pytest.raises(HeaderError, match="command"):
        parser.feed(SIG + b"\x2f\x11\xff\xff")


def test_v2_wants_no_more_than_its_length():
    parser = Parser()
    assert parser.feed(SIG[:5]) == 5
    assert parser.wanted() == 11
    parser.feed(SIG[5:] + b"\x21\x11\x00\x0c")
    assert parser.wanted() == 12
    assert parser.header is None and parser.started()
