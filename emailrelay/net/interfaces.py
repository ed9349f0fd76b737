"""Network interface names in `--interface`: `eth0`, `ppp0-ipv4`, `lo-ipv6`.

`split_name(text)` splits a name from its optional `-ipv4`/`-ipv6` suffix;
`addresses(name, family=None)` lists the addresses the interface has now,
read from the kernel with the standard library: IPv4 through the
SIOCGIFCONF ioctl (every address, including labelled aliases such as
`eth0:1`), IPv6 from /proc/net/if_inet6 (link-local addresses carry their
`%name` scope). It raises `InterfaceError` for an interface that does not
exist, or one without an address of the family asked for: a ppp link that
is down must stop start-up, not make the relay listen on everything.
"""

import array
import fcntl
import socket
import struct

SIOCGIFCONF = 0x8912
IF_INET6 = "/proc/net/if_inet6"
# struct ifreq: a 16-byte name, then a union whose largest member is struct
# ifmap (two unsigned longs, a short and three chars, padded).
_IFREQ_SIZE = 16 + max(16, struct.calcsize("LLHBBB0L"))


class InterfaceError(ValueError):
    """An interface name that cannot be used; str() says why."""


def split_name(text):
    """(name, family) where family is 4, 6 or None (every address)."""
    for suffix, family in (("-ipv4", 4), ("-ipv6", 6)):
        if text.endswith(suffix) and len(text) > len(suffix):
            return text[:-len(suffix)], family
    return text, None


def exists(name):
    """True when the kernel knows an interface called `name`."""
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def ipv4_addresses(name):
    """The IPv4 addresses of interface `name` (and of its `name:label` aliases)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        size = 64 * _IFREQ_SIZE
        while True:
            buf = array.array("B", bytes(size))
            address, _ = buf.buffer_info()
            ifconf = struct.pack("iL", size, address)
            used = struct.unpack("iL", fcntl.ioctl(sock.fileno(), SIOCGIFCONF, ifconf))[0]
            if used < size:
                break
            size *= 2
    data = buf.tobytes()[:used]
    for offset in range(0, used, _IFREQ_SIZE):
        label = data[offset:offset + 16].split(b"\0", 1)[0].decode("ascii", "replace")
        if label == name or label.split(":", 1)[0] == name:
            found.append(socket.inet_ntoa(data[offset + 20:offset + 24]))
    return found


def ipv6_addresses(name, path=IF_INET6):
    """The IPv6 addresses of interface `name`; link-local ones with `%name`."""
    found = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[5] != name:
            continue
        raw = bytes.fromhex(fields[0])
        text = socket.inet_ntop(socket.AF_INET6, raw)
        if raw[:2] == b"\xfe\x80":
            text += "%" + name
        found.append(text)
    return found


def addresses(name, family=None):
    """The addresses to listen on for `name`; raises InterfaceError."""
    if not exists(name):
        raise InterfaceError("no such network interface: %s" % name)
    found = []
    if family in (None, 4):
        found += ipv4_addresses(name)
    if family in (None, 6):
        found += ipv6_addresses(name)
    if not found:
        what = {None: "", 4: "IPv4 ", 6: "IPv6 "}[family]
        raise InterfaceError("network interface %s has no %saddress" % (name, what))
    return found
