"""Address helpers: the local-address rule behind --remote-clients, patterns, host:port."""

import pytest

from emailrelay.util import addresses


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.9.9.9", "10.1.2.3", "172.16.0.1", "172.31.255.254",
                                "192.168.1.1", "169.254.0.7", "::1", "fd00::1", "fe80::1%eth0",
                                "::ffff:192.168.0.1", "::ffff:127.0.0.1"])
def test_local_addresses(ip):
    assert addresses.is_local(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "172.32.0.1", "192.169.0.1", "2001:db8::1",
                                "::ffff:8.8.8.8", "not-an-ip", ""])
def test_remote_addresses(ip):
    assert not addresses.is_local(ip)


@pytest.mark.parametrize("ip,pattern,ok", [
    ("192.168.0.7", "192.168.0.*", True),
    ("192.168.1.7", "192.168.0.*", False),
    ("192.168.0.7", "192.168.0.0/24", True),
    ("192.168.1.7", "192.168.0.0/24", False),
    ("fe80::1", "fe80::/64", True),
    ("fe81::1", "fe80::/64", False),
    ("::ffff:192.168.0.9", "192.168.0.*", True),
    ("10.0.0.1", "10.0.0.1", True),
    ("10.0.0.1", "bogus/99", False),
    ("fe80::1", "192.168.0.*", False),
])
def test_match_pattern(ip, pattern, ok):
    assert addresses.match_pattern(ip, pattern) is ok


@pytest.mark.parametrize("text,expected", [
    ("smtp.example.com:587", ("smtp.example.com", 587)),
    ("127.0.0.1:25", ("127.0.0.1", 25)),
    ("[::1]:2525", ("::1", 2525)),
    ("::1:2525", ("::1", 2525)),
    ("example.com:smtp", ("example.com", 25)),
])
def test_parse_hostport(text, expected):
    assert addresses.parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["example.com", ":25", "host:0", "host:70000", "host:nosuchservice", "[::1"])
def test_parse_hostport_errors(text):
    with pytest.raises(ValueError):
        addresses.parse_hostport(text)


def test_parse_forward_to_with_socks():
    assert addresses.parse_forward_to("myisp.net:smtp@localhost:9050") == ("myisp.net", 25, "localhost", 9050)
    assert addresses.parse_forward_to("127.0.0.1:2525") == ("127.0.0.1", 2525, None, None)
    assert addresses.parse_forward_to("mail.example.com") == ("mail.example.com", 25, None, None)
