"""Address verifiers (`--address-verifier`), E-MailRelay's interfaces.

`make(spec, timeout)` returns a verifier; `verify(rcpt, from_, client_ip,
domain, auth_mech, auth_name)` asks it about one recipient (RCPT or VRFY)
and returns a VerifyResult. `verify` may be called from several threads.
The mechanism is passed lower-case, and as `none` when the client did not
authenticate (also for a trusted address, whose keyword is the name).

A program is run once per recipient with six arguments, in the order seed
000 documents: the recipient, the local domain, the envelope sender (empty
for VRFY), the client's IP address, the authentication mechanism and the
authentication name (or the trusted-address keyword). It runs the way
filters do (see `filters`): no shell, almost empty environment,
stdin/stderr on /dev/null, a timeout.

Exit status and output:
- 0: a local mailbox; line 1 is the full name, line 2 the mailbox name.
- 1: a valid remote address; line 2 is the address to use (default: as given).
- 2: reject (550) with the output as the reason.
- 3: temporary failure (450) with the output as the reason.
- 100: abort the connection.
- any other exit status: reject (550), the output being the reason (seed
  000: "for invalid addresses the exit value should be non-zero and
  anything written to the standard output is taken as the reason").
- a timeout, a crash or a program that cannot be started: a temporary
  failure, never an accepted address.

A verifier program should print `2.0` when run with the single argument
`--emailrelay-version`; `version()` asks it (once) so the caller can warn
about a program that does not.

`net:<transport-address>` (`net:127.0.0.1:10026`, `net:/run/verifier.sock`)
asks a verifier daemon instead, over a kept connection (see
`requestclient`). The request is one line per recipient,
`to|LOCAL-PART|DOMAIN|THIS-HOST|from|client-ip|mechanism|name`, with the
local part, the domain and this host's name (the local domain) upper-cased,
as E-MailRelay's network verifier sends it. The answer is a program's exit
status and output in reverse, pipe-delimited: `0|mailbox|Full Name`,
`1|address`, `2|reason`, `3|reason`, `100`. Any other answer, a timeout or
no daemon is a temporary failure (450) with a log line; E-MailRelay answers
a permanent error there, but a temporary one loses no mail.
"""

import threading

from ..runtime import log
from . import filters, requestclient

VERSION = "2.0"


class VerifyResult:
    """`status` is 'local', 'remote', 'reject', 'tempfail' or 'abort'.

    `address`: the mailbox (local) or the address (remote), else ''.
    `full_name`: line 1 of the output for local mailboxes, else ''.
    `reason`: text for the SMTP reply on reject/tempfail ('' otherwise).
    """

    def __init__(self, status, address="", full_name="", reason=""):
        self.status = status
        self.address = address
        self.full_name = full_name
        self.reason = reason

    def __repr__(self):
        return "VerifyResult(%r, address=%r, reason=%r)" % (self.status, self.address, self.reason)


class Verifier:
    """One configured verifier program; `verify` may be called from several threads."""

    def __init__(self, spec, argv, timeout):
        self.spec = spec
        self.argv = argv
        self.timeout = timeout
        self._version = None
        self._lock = threading.Lock()

    def version(self):
        """What the program prints for `--emailrelay-version` (first line, or '')."""
        with self._lock:
            if self._version is None:
                ran = filters.run_program(self.argv + ["--emailrelay-version"], self.timeout)
                lines = ran.output.split("\n")
                self._version = lines[0].strip() if ran.code == 0 and lines else ""
            return self._version

    def verify(self, rcpt, from_, client_ip, domain, auth_mech, auth_name):
        """Runs the program for one recipient; returns a VerifyResult.

        `from_` is '' for VRFY; `auth_mech` '' or 'none' when the client did
        not authenticate.
        """
        args = [rcpt, domain, from_, client_ip, _mechanism(auth_mech), auth_name]
        ran = filters.run_program(self.argv + args, self.timeout)
        lines = [line.rstrip("\r") for line in ran.output.split("\n")]
        if lines and not lines[-1]:
            lines.pop()
        if ran.code is None:
            what = {"timeout": "timed out", "crash": "crashed"}.get(ran.error, "failed")
            return VerifyResult("tempfail", reason="address verifier %s" % what)
        if ran.code == 0:
            mailbox = filters.clean_text(lines[1]) if len(lines) > 1 else ""
            full_name = filters.clean_text(lines[0]) if lines else ""
            return VerifyResult("local", mailbox or rcpt, full_name)
        if ran.code == 1:
            address = filters.clean_text(lines[1]) if len(lines) > 1 else ""
            return VerifyResult("remote", address or rcpt)
        reason = filters.clean_text(" ".join(lines))
        if ran.code == 3:
            return VerifyResult("tempfail", reason=reason or "address temporarily unavailable")
        if ran.code == 100:
            return VerifyResult("abort")
        return VerifyResult("reject", reason=reason or "invalid address")


def _mechanism(auth_mech):
    return (auth_mech or "none").lower()


class NetVerifier:
    """A `net:` verifier: asks a verifier daemon about each recipient."""

    def __init__(self, spec, location, timeout):
        self.spec = spec
        self.client = requestclient.RequestClient(location, timeout)

    def verify(self, rcpt, from_, client_ip, domain, auth_mech, auth_name):
        """Asks the daemon about one recipient; returns a VerifyResult."""
        local, at, rcpt_domain = rcpt.rpartition("@")
        if not at:
            local, rcpt_domain = rcpt, ""
        fields = [rcpt, local.upper(), rcpt_domain.upper(), domain.upper(), from_, client_ip,
                  _mechanism(auth_mech), auth_name]
        line = "|".join(f.replace("|", " ").replace("\r", " ").replace("\n", " ") for f in fields)
        try:
            answer = self.client.request(line)
        except requestclient.RequestError as e:
            log.warning("address verifier %s: %s" % (self.spec, e))
            return VerifyResult("tempfail", reason="address verifier unavailable")
        parts = [filters.clean_text(p) for p in answer.split("|")]
        code = parts[0]
        if code == "0" and len(parts) >= 2:
            return VerifyResult("local", parts[1] or rcpt, parts[2] if len(parts) > 2 else "")
        if code == "1":
            return VerifyResult("remote", (parts[1] if len(parts) > 1 else "") or rcpt)
        if code == "2":
            return VerifyResult("reject", reason=(parts[1] if len(parts) > 1 else "") or
                                "invalid address")
        if code == "3":
            return VerifyResult("tempfail", reason=(parts[1] if len(parts) > 1 else "") or
                                "address temporarily unavailable")
        if code == "100":
            return VerifyResult("abort")
        log.warning("address verifier %s: invalid response: %s"
                    % (self.spec, filters.clean_text(answer)[:200]))
        return VerifyResult("tempfail", reason="address verifier failed")


def make(spec, timeout):
    """Checks `spec` and returns a Verifier or NetVerifier; raises ValueError."""
    text = spec.strip()
    if text.startswith("net:"):
        try:
            location = requestclient.Location.parse(text[4:])
        except ValueError as e:
            raise ValueError("--address-verifier %s: %s" % (spec, e)) from None
        return NetVerifier(spec, location, timeout)
    return Verifier(spec, filters.split_command(text), timeout)
