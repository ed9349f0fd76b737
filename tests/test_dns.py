"""dns: the DNS wire format used for DNSBL look-ups."""

import struct

import pytest

from emailrelay.util import dns


def test_query_wire_format():
    packet = dns.query("2.0.0.127.bl.test", dns.A, 0x1234)
    assert packet == (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
                      b"\x012\x010\x010\x03127\x02bl\x04test\x00\x00\x01\x00\x01")


@pytest.mark.parametrize("name", ["a..b", "x" * 64 + ".test", ".".join(["abcdefgh"] * 32),
                                  "caf\u00e9.test"])
def test_bad_names(name):
    with pytest.raises(dns.DnsError):
        dns.query(name, dns.A, 1)


def response(qid, rcode, answers, compress=True):
    """A response to a query for 2.0.0.127.bl.test with the given A answers."""
    question = dns.encode_name("2.0.0.127.bl.test") + struct.pack("!HH", dns.A, 1)
    out = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, len(answers), 0, 0) + question
    for address in answers:
        name = b"\xc0\x0c" if compress else dns.encode_name("2.0.0.127.bl.test")
        out += name + struct.pack("!HHIH", dns.A, 1, 300, 4) + bytes(map(int, address.split(".")))
    return out


@pytest.mark.parametrize("compress", [True, False])
def test_parse_answers(compress):
    m = dns.parse(response(7, 0, ["127.0.0.2", "127.0.0.10"], compress))
    assert (m.id, m.qr, m.rcode) == (7, True, 0)
    assert m.questions == [("2.0.0.127.bl.test", dns.A)]
    assert m.addresses() == ["127.0.0.2", "127.0.0.10"]
    assert m.answers[0][0] == "2.0.0.127.bl.test"


def test_parse_nxdomain_and_aaaa():
    m = dns.parse(response(9, dns.NXDOMAIN, []))
    assert (m.rcode, m.addresses()) == (dns.NXDOMAIN, [])
    aaaa = response(1, 0, [])[:7] + b"\x01" + response(1, 0, [])[8:] + \
        b"\xc0\x0c" + struct.pack("!HHIH", dns.AAAA, 1, 1, 16) + b"\x00" * 15 + b"\x01"
    assert dns.parse(aaaa).addresses() == ["::1"]


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 11,
    response(1, 0, ["127.0.0.2"])[:-2],                            # truncated rdata
    response(1, 0, [])[:20],                                       # truncated question
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c",  # pointer to itself
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\x40abc",   # reserved label type
    response(1, 0, [])[:7] + b"\x01" + response(1, 0, [])[8:] + b"\xc0\x0c" +
    struct.pack("!HHIH", dns.A, 1, 1, 3) + b"abc",                 # A record of 3 octets
])
def test_malformed_messages_raise(data):
    with pytest.raises(dns.DnsError):
        dns.parse(data)


def test_reverse_names():
    assert dns.reverse_name("1.2.3.4") == "4.3.2.1"
    assert dns.reverse_name("2001:db8::1") == \
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
