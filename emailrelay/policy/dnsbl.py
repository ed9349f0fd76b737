"""DNS block lists (`--dnsbl`): refuse SMTP connections from listed addresses.

`Dnsbl.parse(text, check_local=False)` reads the option's value in either of
E-MailRelay's forms (raises ValueError):

- old: `dns-server,timeout,threshold,list[,list...]`
  (`127.0.0.1:53,1000,1,zen.spamhaus.org`);
- new: `list[,list...][,threshold[,timeout[,dns-server]]]`
  (`zen.spamhaus.org,bl.spamcop.net,1,2s`).

They are told apart by whether the first field is a domain. The timeout is
in milliseconds, or in seconds with an `s` suffix; a negative timeout means
deny when the lists do not answer in time (otherwise allow). A threshold of
0 means check and log only. Defaults: threshold 1, timeout 5000 ms, and the
first `nameserver` of /etc/resolv.conf (else 127.0.0.1:53).

`check(ip)` runs in the new connection's session thread before the greeting
and returns None to go on, or the SMTP reply to send before closing: `554
5.7.1` naming the lists that listed the address, or `421 4.7.1` when the
lists did not answer in time and the timeout is negative. One A query per
list (`4.3.2.1.<list>`, or reversed nibbles for IPv6) goes out at once over
UDP; the answers are read until the outcome is decided (enough lists listed
the address, or too few are left to reach the threshold) or the time is up.
Each list's answer is logged (info), and a denial as a warning that names
the address and the lists, one line a fail2ban rule can match:
`dnsbl: client address [1.2.3.4] blocked by [zen.spamhaus.org]`.

Local addresses (loopback, private, unique-local, link-local) are not
checked unless `check_local` is set, which main sets from the environment
variable `EMAILRELAY_DNSBL_CHECK_LOCAL=1` (for testing a set-up from the
relay's own host, with a client bound to 127.0.0.2, say).
"""

import ipaddress
import os
import re
import socket
import time

from ..runtime import descriptors, log
from ..util import addresses, dns

DEFAULT_THRESHOLD = 1
DEFAULT_TIMEOUT_MS = 5000
RESOLV_CONF = "/etc/resolv.conf"
_TIMEOUT = re.compile(r"-?[0-9]+s?\Z")


def is_domain(field):
    """True when a config field is a list's domain rather than a number or an address."""
    field = field.strip()
    if not field or ":" in field or "[" in field or _TIMEOUT.match(field):
        return False
    return not field.rstrip(".").rsplit(".", 1)[-1].isdigit()


def default_server(resolv_conf=RESOLV_CONF):
    """(ip, 53) of the first nameserver in resolv.conf, else 127.0.0.1."""
    try:
        with open(resolv_conf, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    try:
                        ipaddress.ip_address(words[1].split("%")[0])
                    except ValueError:
                        continue
                    return (words[1], 53)
    except OSError:
        pass
    return ("127.0.0.1", 53)


def _server(field):
    host, port = addresses.parse_hostport(field, default_port=53)
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        raise ValueError("the DNS server must be an IP address: %r" % field) from None
    return (host, port)


def _timeout(field):
    if not _TIMEOUT.match(field):
        raise ValueError("invalid timeout %r (milliseconds, or seconds with an s suffix)" % field)
    negative = field.startswith("-")
    digits = field.lstrip("-")
    ms = int(digits[:-1]) * 1000 if digits.endswith("s") else int(digits)
    return ms / 1000.0, negative


def _threshold(field):
    if not field.isdigit():
        raise ValueError("invalid threshold %r" % field)
    return int(field)


class Dnsbl:
    """A parsed --dnsbl configuration; `check` may run in several threads at once.

    Attributes: `server` (ip, port), `timeout` (seconds), `allow_on_timeout`,
    `threshold`, `lists`, `check_local`.
    """

    def __init__(self, server, timeout, allow_on_timeout, threshold, lists, check_local=False):
        self.server = server
        self.timeout = timeout
        self.allow_on_timeout = allow_on_timeout
        self.threshold = threshold
        self.lists = lists
        self.check_local = check_local

    @classmethod
    def parse(cls, text, check_local=False, resolv_conf=RESOLV_CONF):
        """The Dnsbl for an option value; raises ValueError."""
        fields = [f.strip() for f in text.split(",")]
        if not fields or not fields[0]:
            raise ValueError("empty configuration")
        if not is_domain(fields[0]):
            if len(fields) < 4:
                raise ValueError("expected dns-server,timeout,threshold,list[,list...]")
            server = _server(fields[0])
            timeout, negative = _timeout(fields[1])
            threshold = _threshold(fields[2])
            lists = fields[3:]
        else:
            n = 0
            while n < len(fields) and is_domain(fields[n]):
                n += 1
            lists, rest = fields[:n], fields[n:]
            if len(rest) > 3:
                raise ValueError("unused fields after the DNS server: %s" % ",".join(rest[3:]))
            threshold = _threshold(rest[0]) if rest else DEFAULT_THRESHOLD
            timeout, negative = _timeout(rest[1]) if len(rest) > 1 else \
                (DEFAULT_TIMEOUT_MS / 1000.0, False)
            server = _server(rest[2]) if len(rest) > 2 else default_server(resolv_conf)
        for name in lists:
            if not is_domain(name):
                raise ValueError("invalid list domain %r" % name)
            try:
                dns.encode_name(name)
            except dns.DnsError as e:
                raise ValueError(str(e)) from None
        allow_on_timeout = threshold == 0 or not negative
        return cls(server, timeout, allow_on_timeout, threshold, lists, check_local)

    def check(self, ip):
        """None to allow the connection from `ip`, or the reply that refuses it."""
        addr = ipaddress.ip_address(ip.split("%")[0])
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        ip = str(addr)
        if not self.check_local and addresses.is_local(ip):
            log.verbose("dnsbl: not checking local address [%s]" % ip)
            return None
        answers, pending = self._ask(ip)
        denied = [name for name in self.lists if answers.get(name)]
        for name in self.lists:
            if name in pending:
                log.info("dnsbl: address [%s] not checked by [%s]" % (ip, name))
            elif answers[name]:
                log.info("dnsbl: address [%s] denied by [%s]: %s"
                         % (ip, name, " ".join(answers[name])))
            else:
                log.info("dnsbl: address [%s] allowed by [%s]" % (ip, name))
        if self.threshold and len(denied) >= self.threshold:
            log.warning("dnsbl: client address [%s] blocked by [%s]" % (ip, "] [".join(denied)))
            return "554 5.7.1 client address %s is blocked by %s" % (ip, ", ".join(denied))
        if pending and len(denied) + len(pending) >= max(self.threshold, 1):
            laggards = "] [".join(n for n in self.lists if n in pending)
            if self.allow_on_timeout:
                log.warning("dnsbl: client address [%s]: timeout: no answer from [%s]"
                            % (ip, laggards))
                return None
            log.warning("dnsbl: client address [%s] blocked: timeout: no answer from [%s]"
                        % (ip, laggards))
            return "421 4.7.1 cannot check the client address with the DNS block lists, " \
                   "try again later"
        return None

    def _ask(self, ip):
        """({list: [addresses]} for the lists that answered, {pending lists})."""
        try:
            return self._ask_server(ip)
        except OSError as e:
            # No usable DNS server is the same as no answer in time.
            log.warning("dnsbl: cannot ask DNS server %s: %s"
                        % (addresses.format_address(*self.server), e.strerror or e))
            return {}, set(self.lists)

    def _ask_server(self, ip):
        prefix = dns.reverse_name(ip)
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        target = socket.getaddrinfo(self.server[0], self.server[1], family,
                                    socket.SOCK_DGRAM)[0][4]
        by_id = {}
        answers = {}
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            for name in self.lists:
                qid = int.from_bytes(os.urandom(2), "big")
                while qid in by_id:
                    qid = int.from_bytes(os.urandom(2), "big")
                by_id[qid] = name
                sock.sendto(dns.query(prefix + "." + name, dns.A, qid), target)
            deadline = time.monotonic() + self.timeout
            while by_id and not self._decided(answers, len(by_id)):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not descriptors.readable(sock, remaining):
                    break
                try:
                    data, source = sock.recvfrom(4096)
                except OSError:
                    continue
                if source[:2] != target[:2]:
                    continue
                try:
                    message = dns.parse(data)
                except dns.DnsError as e:
                    log.verbose("dnsbl: invalid DNS response: %s" % e)
                    continue
                name = by_id.get(message.id)
                if name is None or not message.qr:
                    continue
                del by_id[message.id]
                answers[name] = message.addresses() if message.rcode == dns.NOERROR else []
        return answers, set(by_id.values())

    def _decided(self, answers, pending):
        if not self.threshold:
            return False
        denied = sum(1 for a in answers.values() if a)
        return denied >= self.threshold or denied + pending < self.threshold
