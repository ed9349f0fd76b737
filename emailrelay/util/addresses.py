"""Network address helpers: what counts as local, and host:port parsing.

Pure functions with no I/O beyond the service-name lookup done by
`parse_hostport`; every layer may use them.
"""

import ipaddress
import socket

# Ranges that count as "local" for the open-relay guard (--remote-clients):
# loopback, RFC 1918 private, RFC 6598 shared, RFC 4193 unique-local and
# link-local, as the man page describes.
_LOCAL_NETWORKS = [ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
    "169.254.0.0/16", "100.64.0.0/10",
    "::1/128", "fc00::/7", "fe80::/10",
)]


def _ip(text):
    """Parses an address, dropping an IPv6 zone and unwrapping IPv4-mapped."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_local(ip):
    """True when `ip` (a string) is loopback, private or link-local.

    Anything that does not parse as an IP address is not local.
    """
    try:
        addr = _ip(ip)
    except ValueError:
        return False
    return any(addr.version == net.version and addr in net for net in _LOCAL_NETWORKS)


def refused_by_guard(ip, remote_clients):
    """True when the open-relay guard refuses a client at `ip`.

    Without --remote-clients (`remote_clients` false) only local addresses
    (`is_local`) may connect; the refusal's log line names the option.
    """
    return not remote_clients and not is_local(ip)


GUARD_HINT = "see --remote-clients"


def match_pattern(ip, pattern):
    """True when `ip` matches a secrets-file address pattern.

    Patterns are an exact address, an IPv4 wildcard such as `192.168.0.*`,
    or a network in CIDR form such as `192.168.0.0/24` or `fe80::/64`.
    A malformed pattern or address never matches.
    """
    try:
        addr = _ip(ip)
        if "*" in pattern:
            parts = pattern.split(".")
            if addr.version != 4 or len(parts) != 4:
                return False
            return all(p == "*" or p == q for p, q in zip(parts, str(addr).split(".")))
        if "/" in pattern:
            net = ipaddress.ip_network(pattern, strict=False)
            return addr.version == net.version and addr in net
        return addr == _ip(pattern)
    except ValueError:
        return False


def check_pattern(pattern):
    """Returns `pattern` if `match_pattern` takes it as a pattern, else raises ValueError."""
    if "*" in pattern:
        parts = pattern.split(".")
        if len(parts) != 4 or not all(p == "*" or (p.isdigit() and int(p) < 256) for p in parts):
            raise ValueError("invalid address pattern %r" % pattern)
        return pattern
    try:
        if "/" in pattern:
            ipaddress.ip_network(pattern, strict=False)
        else:
            ipaddress.ip_address(pattern)
    except ValueError:
        raise ValueError("invalid address pattern %r" % pattern) from None
    return pattern


def parse_port(text):
    """A port number or service name (`smtp`) as an int in 1..65535.

    Raises ValueError with a short message.
    """
    text = text.strip()
    if text.isdigit():
        port = int(text)
    else:
        try:
            port = socket.getservbyname(text, "tcp")
        except OSError:
            raise ValueError("invalid port %r" % text) from None
    if not 0 < port < 65536:
        raise ValueError("port out of range: %s" % text)
    return port


def parse_hostport(text, default_port=None):
    """Splits `host:port`, `[v6]:port` or `v6-literal:port` into (host, port).

    With `default_port`, a bare host is allowed. Raises ValueError.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError("invalid address %r" % text)
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") > 1:
        host, _, port = text.rpartition(":")
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            host, port = text, ""
    else:
        host, _, port = text.partition(":")
    if not host:
        raise ValueError("invalid address %r: no host" % text)
    if not port:
        if default_port is None:
            raise ValueError("invalid address %r: no port" % text)
        return host, default_port
    return host, parse_port(port)


def parse_forward_to(text):
    """Parses a forward-to address, with an optional `@socks-host:port`.

    Returns (host, port, socks_host, socks_port); the socks fields are None
    when no proxy is named. Raises ValueError.
    """
    target, sep, proxy = text.rpartition("@")
    if not sep:
        host, port = parse_hostport(text, 25)
        return host, port, None, None
    host, port = parse_hostport(target, 25)
    socks_host, socks_port = parse_hostport(proxy)
    return host, port, socks_host, socks_port


def format_address(host, port):
    """`host:port`, with brackets around an IPv6 literal."""
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)
