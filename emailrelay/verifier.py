"""Address verifier programs (`--address-verifier`), E-MailRelay's interface.

The program is run once per RCPT (and VRFY) with six arguments: the
recipient, the local domain, the envelope sender (empty for VRFY), the
client's IP address, the authentication mechanism (`none` for a trusted
address, empty when not authenticated) and the authentication name (or the
trusted-address keyword). It runs the way filters do (see `filters`): no
shell, almost empty environment, stdin/stderr on /dev/null, a timeout.

Exit status and output:
- 0: a local mailbox; line 1 is the full name, line 2 the mailbox name.
- 1: a valid remote address; line 2 is the address to use (default: as given).
- 2: reject (550) with the output as the reason.
- 3: temporary failure (450) with the output as the reason.
- 100: abort the connection.
- anything else, a timeout, a crash or a program that cannot be started: a
  temporary failure, never an accepted address.

A verifier should print `2.0` when run with the single argument
`--emailrelay-version`; `Verifier.version()` asks it (once) so the caller
can warn about a program that does not.
"""

import threading

from . import filters

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

        `from_` is '' for VRFY; `auth_mech` is 'none' for a trusted client
        and '' for one that did not authenticate.
        """
        args = [rcpt, domain, from_, client_ip, auth_mech, auth_name]
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
        if ran.code == 2:
            return VerifyResult("reject", reason=reason or "invalid address")
        if ran.code == 3:
            return VerifyResult("tempfail", reason=reason or "address temporarily unavailable")
        if ran.code == 100:
            return VerifyResult("abort")
        return VerifyResult("tempfail", reason="address verifier failed (exit %d)" % ran.code)


def make(spec, timeout):
    """Checks `spec` and returns a Verifier; raises ValueError or NotImplementedSpec."""
    text = spec.strip()
    if text.startswith("net:"):
        raise filters.NotImplementedSpec("--address-verifier %s: the net: form is not "
                                         "implemented in this version" % spec)
    return Verifier(spec, filters.split_command(text), timeout)
