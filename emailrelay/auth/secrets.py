"""Secrets files: account names, passwords and trusted client addresses.

The format is E-MailRelay's. Blank lines and lines starting with `#` are
ignored; every other line has white-space separated fields:

    client|server  plain|plain:b|md5|none|oauth  <user>  <secret>  [<selector>]

The first two fields are case-insensitive. The mechanism words of older
E-MailRelay files are accepted too: `login` means `plain`, `cram-md5` and
`apop` mean `md5`. `<user>` is xtext; `<secret>` is
the xtext password (`plain`), an `emailrelay-passwd` state (`md5`, any form
`md5state.decode_state` reads) or, for `client oauth`, a bearer token for
XOAUTH2. With `plain:b` (newer E-MailRelay versions) the user and password
are base64 instead of xtext. A fifth field is allowed on client lines only: an account selector
matched against an envelope's `ClientAccountSelector`. `server none
<address-pattern> <keyword>` marks trusted client addresses: an exact IPv4
or IPv6 address, an IPv4 wildcard such as `192.168.0.*`, or a network such
as `192.168.0.0/24` or `fe80::/64`; the keyword goes to the address verifier.
An IPv4-mapped IPv6 peer matches IPv4 patterns.

`PAM_PATH` (`/pam`) is not a file: callers check for it and use `pam`.
A second server entry for the same user, or a second client entry for the
same selector, is an error rather than a silent choice.
"""

import base64
import binascii

from ..util import addresses, xtext
from . import md5state

PAM_PATH = "/pam"

# Mechanism words of older E-MailRelay secrets files, and what they mean now.
_LEGACY_KINDS = {"login": "plain", "cram-md5": "md5", "apop": "md5"}


class SecretsError(Exception):
    """A secrets file that cannot be read or has a malformed line.

    The message names the file (and the line number for a bad line).
    """


class Secret:
    """One account: `kind` ('plain', 'md5' or 'oauth'), `user` (decoded).

    `password` is the decoded plain password (str) for 'plain', the token for
    'oauth', else None; `state` is the 32-byte HMAC-MD5 state for 'md5', else
    None; `selector` is the client account selector ('' for the default).
    """

    def __init__(self, kind, user, password=None, state=None, selector=""):
        self.kind = kind
        self.user = user
        self.password = password
        self.state = state
        self.selector = selector

    def __repr__(self):
        return "Secret(%s, %r)" % (self.kind, self.user)


class Secrets:
    """The parsed contents of one secrets file; read-only once loaded."""

    def __init__(self, path=""):
        self.path = path
        self._server = {}
        self._client = {}
        self._trusted = []

    @classmethod
    def load(cls, path):
        """Reads and parses `path`; raises SecretsError on any problem."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SecretsError("cannot read secrets file %s: %s" % (path, e.strerror or e)) from None
        return cls.parse(data.decode("utf-8", "surrogateescape"), path)

    @classmethod
    def parse(cls, text, path="<secrets>"):
        """Parses secrets-file `text`; `path` is only used in error messages."""
        secrets = cls(path)
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            try:
                secrets._add(fields)
            except ValueError as e:
                raise SecretsError("%s:%d: %s" % (path, number, e)) from None
        return secrets

    def _add(self, fields):
        side = fields[0].lower()
        kind = fields[1].lower() if len(fields) > 1 else ""
        kind = _LEGACY_KINDS.get(kind, kind)
        if side not in ("client", "server"):
            raise ValueError("first field must be 'client' or 'server', not %r" % fields[0])
        if side == "server" and len(fields) != 4:
            raise ValueError("a server line needs four fields, not %d" % len(fields))
        if side == "client" and len(fields) not in (4, 5):
            raise ValueError("a client line needs four or five fields, not %d" % len(fields))
        if side == "server" and kind == "none":
            self._trusted.append((addresses.check_pattern(fields[2]), fields[3]))
            return
        allowed = ("plain", "plain:b", "md5") + (("oauth",) if side == "client" else ())
        if kind not in allowed:
            raise ValueError("second field of a %s line must be one of %s, not %r"
                             % (side, ", ".join(allowed), fields[1]))
        secret = _secret(kind, fields[2], fields[3])
        user = secret.user
        if side == "server":
            if user in self._server:
                raise ValueError("second server entry for user %r" % user)
            self._server[user] = secret
        else:
            secret.selector = fields[4] if len(fields) == 5 else ""
            if secret.selector in self._client:
                raise ValueError("second client entry for selector %r" % secret.selector
                                 if secret.selector else "second client entry")
            self._client[secret.selector] = secret

    def server_secret(self, user):
        """The server Secret for `user` (exact, case-sensitive), or None."""
        return self._server.get(user)

    def client_secret(self, selector=""):
        """The client Secret for `selector` ('' = the default line), or None."""
        return self._client.get(selector)

    def trusted(self, ip):
        """The keyword of the first trusted-address line matching `ip`, or None."""
        for pattern, keyword in self._trusted:
            if addresses.match_pattern(ip, pattern):
                return keyword
        return None

    def has_server(self):
        """True when there is at least one server account (not counting trusted lines)."""
        return bool(self._server)

    def has_trusted(self):
        """True when there is at least one trusted-address (`server none`) line."""
        return bool(self._trusted)

    def has_client(self):
        """True when there is at least one client line."""
        return bool(self._client)

    def server_kinds(self):
        """The set of server secret kinds present ('plain', 'md5')."""
        return {s.kind for s in self._server.values()}


def _secret(kind, user_field, secret_field):
    """The Secret for one account line; raises ValueError."""
    if kind == "plain:b":
        return Secret("plain", _b64text(user_field), password=_b64text(secret_field))
    user = xtext.decode(user_field)
    if kind == "md5":
        try:
            return Secret(kind, user, state=md5state.decode_state(secret_field))
        except md5state.StateError as e:
            raise ValueError(str(e)) from None
    if kind == "oauth":
        return Secret(kind, user, password=secret_field)
    return Secret(kind, user, password=xtext.decode(secret_field))


def _b64text(field):
    try:
        return base64.b64decode(field, validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64 field %r in a plain:b line" % field) from None


class Reloadable:
    """A secrets file that can be re-read (on SIGHUP) while sessions use it.

    `get()` returns the current Secrets; a session should call it once and
    keep the result. `reload()` re-reads the file; on failure it keeps the old
    contents and raises SecretsError so the caller can log it.
    """

    def __init__(self, path):
        self.path = path
        self._current = Secrets.load(path)

    def get(self):
        """The Secrets read most recently."""
        return self._current

    def reload(self):
        """Re-reads the file; raises SecretsError (keeping the old secrets) on failure."""
        self._current = Secrets.load(self.path)
