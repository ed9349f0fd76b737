"""What to listen on, and opening the listening sockets.

`parse_interfaces` reads --interface values, `systemd_sockets` the sockets
systemd socket activation passes, `listen_backlog` says how deep the
listen() queue is, and `open_socket` turns one address (or `fd#N`) into a
listening socket. `listeners.Server` uses them; build and the local-daemon
tool read --interface with `parse_interfaces`.
"""

import errno
import os
import socket

from ..util import addresses
from . import interfaces

KINDS = ("smtp", "pop", "admin")
SD_LISTEN_FDS_START = 3


def parse_interfaces(values):
    """Splits --interface values into {kind: [address, ...]}.

    Values may be comma lists and carry `smtp=`, `pop=` or `admin=` prefixes;
    an unprefixed address applies to every kind (key None). `fd#N` names an
    inherited listening socket. An interface name (`eth0`, `ppp0-ipv4`)
    stands for its addresses now (see `interfaces`). Raises ValueError.
    """
    result = {}
    for value in values or []:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            kind = None
            if "=" in item:
                kind, _, item = item.partition("=")
                if kind not in KINDS:
                    raise ValueError("invalid interface prefix %r" % (kind + "="))
            if not item.startswith("fd#"):
                try:
                    addresses._ip(item)
                except ValueError:
                    name, family = interfaces.split_name(item)
                    result.setdefault(kind, []).extend(interfaces.addresses(name, family))
                    continue
            elif not item[3:].isdigit():
                raise ValueError("invalid interface %r" % item)
            result.setdefault(kind, []).append(item)
    return result


def listen_backlog(wanted=0):
    """The listen() backlog to use: `wanted`, or the system maximum when 0.

    The maximum is /proc/sys/net/core/somaxconn where Linux has it (the
    kernel silently caps any larger value there), else socket.SOMAXCONN.
    """
    if wanted:
        return wanted
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(int(f.read().split()[0]), 1)
    except (OSError, ValueError, IndexError):
        return socket.SOMAXCONN


def systemd_sockets(environ=None):
    """Sockets passed by systemd socket activation (Accept=no), as interfaces.

    Returns {kind: ["fd#N", ...]} for the descriptors that LISTEN_FDS and
    LISTEN_PID give this process, each under the kind its LISTEN_FDNAMES
    entry names (smtp, pop or admin; anything else is smtp), or {} when
    there are none. The variables are removed, as sd_listen_fds() does, so
    that no child takes the sockets for its own.
    """
    environ = os.environ if environ is None else environ
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return {}
    result = {}
    for i in range(int(count)):
        name = names[i] if i < len(names) else ""
        kind = name if name in KINDS else "smtp"
        result.setdefault(kind, []).append("fd#%d" % (SD_LISTEN_FDS_START + i))
    return result


def wildcard_addresses():
    """What to listen on when no interface is given: IPv4, and IPv6 where it works."""
    items = ["0.0.0.0"]
    if socket.has_ipv6 and _ipv6_works():
        items.append("::")
    return items


def open_socket(item, port, backlog):
    """A listening socket for `item` (an address, or `fd#N`: an inherited socket).

    Raises OSError whose strerror names the address (and, for a port below
    1024 that may not be bound, what it needs).
    """
    if item.startswith("fd#"):
        return socket.socket(fileno=int(item[3:]))
    try:
        return _bind(item, port, backlog)
    except OSError as e:
        hint = ""
        if e.errno == errno.EACCES and port < 1024:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        raise OSError(e.errno, "cannot listen on %s: %s%s"
                      % (addresses.format_address(item, port), e.strerror, hint)) from None


def _bind(host, port, backlog):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" means IPv6 only, as the reference says; 0.0.0.0 covers IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            info = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
            sock.bind(info)
        else:
            sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _ipv6_works():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.close()
        return True
    except OSError:
        return False
