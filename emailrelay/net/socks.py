"""SOCKS 4a client: an outgoing TCP connection made through a proxy.

Used when --forward-to names a proxy (`host:port@proxy-host:proxy-port`).
The proxy resolves the host name (SOCKS 4a), so a Tor node or `ssh -D`
tunnel does the DNS look-up at its end.
"""

import ipaddress
import socket
import struct

GRANTED = 0x5A
_REPLIES = {
    0x5B: "request rejected or failed",
    0x5C: "the proxy cannot reach identd on the client",
    0x5D: "identd user-id mismatch",
}


class SocksError(ConnectionError):
    """The proxy refused or broke the connection request."""


def _request(host, port):
    """A CONNECT request: SOCKS 4 for an IPv4 literal, SOCKS 4a otherwise."""
    try:
        ip = ipaddress.IPv4Address(host)
        return struct.pack(">BBH4s", 4, 1, port, ip.packed) + b"\0"
    except ValueError:
        pass
    return struct.pack(">BBH4s", 4, 1, port, b"\0\0\0\1") + b"\0" + host.encode("idna") + b"\0"


def connect(proxy_host, proxy_port, host, port, timeout, source=None):
    """Connects to `host:port` through the SOCKS 4a proxy; returns the socket.

    `timeout` covers connecting to the proxy and its reply; `source` is an
    optional (address, port) to bind. Raises SocksError when the proxy says
    no, OSError for network failures.
    """
    sock = socket.create_connection((proxy_host, proxy_port), timeout, source_address=source)
    try:
        handshake(sock, proxy_host, proxy_port, host, port)
    except BaseException:
        sock.close()
        raise
    return sock


def handshake(sock, proxy_host, proxy_port, host, port):
    """Asks the SOCKS 4a proxy connected on `sock` for a connection to `host:port`.

    Raises SocksError when the proxy says no, OSError for network failures;
    the caller closes the socket then.
    """
    sock.sendall(_request(host, port))
    reply = b""
    while len(reply) < 8:
        data = sock.recv(8 - len(reply))
        if not data:
            raise SocksError("SOCKS proxy %s:%d closed the connection while connecting "
                             "to %s:%d" % (proxy_host, proxy_port, host, port))
        reply += data
    if reply[1] != GRANTED:
        raise SocksError("SOCKS proxy %s:%d refused the connection to %s:%d: %s (0x%02x)"
                         % (proxy_host, proxy_port, host, port,
                            _REPLIES.get(reply[1], "unexpected reply"), reply[1]))
