"""SMTP AUTH (RFC 4954) mechanisms, server side and client side.

Server side: `ServerAuth(source, config_text)` where `source` is a
`secrets.Reloadable`, a `secrets.Secrets` or the string `secrets.PAM_PATH`.
It knows which mechanisms to advertise (`mechanisms(tls)`) and runs one
exchange per AUTH command:

    exchange = auth.start(mech, initial_response, tls=conn.tls)  # MechanismError -> 504
    result = exchange.step(None)
    while result[0] == 'challenge':
        send '334 ' + result[1]; line = read a line
        result = exchange.step(line)
    # ('ok', user) -> 235;  ('fail', 'cancelled') -> 501;  ('fail', reason) -> 535

Challenges come out base64-encoded and client lines go in as sent (base64,
`*` to cancel), so the SMTP session never deals with base64 itself. The
initial response is the text after the mechanism name (`=` for empty).

Mechanisms: PLAIN, LOGIN, CRAM-MD5 (plain or md5 secrets), CRAM-SHA1 and
CRAM-SHA256 (plain secrets only). With PAM: PLAIN only, and only over TLS.
With a checker program (`auth_program.AuthProgram` as the source): PLAIN
and LOGIN, only over TLS. `without_tls=True` (ZMailer's
AUTH-LOGIN-also-without-TLS) offers PAM's and the program's mechanisms in
sessions without TLS as well.

`--server-auth-config` / `--client-auth-config` text is `;`-separated items
`k:list` with comma-separated mechanism names: `m` allowed (server) or
preferred (client) mechanisms in order, `x` denied, and `a`/`d` the same
for a session encrypted with TLS. Without an `a` or `d` item a TLS session
uses the `m`/`x` lists too. Server: `m:;a:plain` offers nothing before TLS
and PLAIN after. When the server offers TLS (`tls_available`) and the
config has no `m` list, the clear-text mechanisms PLAIN and LOGIN are
offered only once TLS is active, as Postfix's smtpd_tls_auth_only does; an
`m` list given by the site is used as it stands. Client: the `m` list is
tried first, in its order, then the other usable mechanisms strongest
first; `x` mechanisms are never used.

Client side: `ClientAuth(secret, config_text)` picks a mechanism from what
the server offers (`choose`), produces the responses (`responses`), and can
run the whole exchange on an `smtplib.SMTP` object (`authenticate`).
"""

import base64
import binascii
import hmac
import os
import socket
import time

from . import md5state, pam, secrets

CLEAR_TEXT = ("PLAIN", "LOGIN")
CRAM = {"CRAM-SHA256": "sha256", "CRAM-SHA1": "sha1", "CRAM-MD5": "md5"}
# Strongest first: the server's advertising order and the client's default preference.
PLAIN_SECRET_MECHANISMS = ["CRAM-SHA256", "CRAM-SHA1", "CRAM-MD5", "PLAIN", "LOGIN"]
KNOWN = set(PLAIN_SECRET_MECHANISMS) | {"XOAUTH2"}
FAILED = "authentication failed"
CANCELLED = "cancelled"
_MAX_ROUNDS = 10


class MechanismError(ValueError):
    """AUTH with a mechanism that is not offered (RFC 4954: 504 5.5.4)."""


class ClientAuthError(Exception):
    """Client-side authentication failed; the message says why."""


def parse_config(text):
    """Parses an auth-config string into {key: [MECH, ...]}; raises ValueError."""
    config = {}
    for item in (text or "").split(";"):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in ("m", "x", "a", "d"):
            raise ValueError("invalid auth-config item %r (expected m:, x:, a: or d: lists)" % item)
        mechs = [m.strip().upper() for m in value.split(",") if m.strip()]
        unknown = [m for m in mechs if m not in KNOWN]
        if unknown:
            raise ValueError("unknown authentication mechanism %r in auth-config" % unknown[0].lower())
        config[key] = mechs
    return config


def _lists(config, tls):
    """The (allow-or-None, deny) lists that apply with or without TLS."""
    if tls and ("a" in config or "d" in config):
        return config.get("a"), config.get("d", [])
    return config.get("m"), config.get("x", [])


def _b64decode(data):
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    data = data.strip()
    if data == b"=":
        return b""
    return base64.b64decode(data, validate=True)


def _text(data):
    return data.decode("utf-8", "surrogateescape")


# -- server side -------------------------------------------------------------

class ServerAuth:
    """Server-side AUTH policy for one secrets source; safe to share between sessions."""

    def __init__(self, source, config_text=None, domain=None, tls_available=False,
                 without_tls=False):
        """`domain` goes in CRAM challenges (default: the host name);
        `tls_available`: sessions can switch to TLS (STARTTLS, STLS);
        `without_tls`: the site lets passwords cross without TLS."""
        self._pam = isinstance(source, str)
        # An auth_program.AuthProgram checks passwords itself, as PAM does.
        self._program = hasattr(source, "check")
        if self._pam and source != secrets.PAM_PATH:
            raise ValueError("not a secrets source: %r" % source)
        self._source = source
        self._config = parse_config(config_text)
        self._domain = domain
        self._without_tls = without_tls
        self._tls_only = tls_available and "m" not in self._config and not without_tls

    def secrets(self):
        """The current Secrets (None with PAM or a checker program)."""
        if self._pam or self._program:
            return None
        return self._source.get() if hasattr(self._source, "get") else self._source

    def supported(self):
        """Every mechanism the secrets allow, strongest first, ignoring config and TLS."""
        if self._pam:
            return ["PLAIN"]
        if self._program:
            return ["PLAIN", "LOGIN"]
        kinds = self.secrets().server_kinds()
        if "plain" in kinds:
            return list(PLAIN_SECRET_MECHANISMS)
        return ["CRAM-MD5"] if "md5" in kinds else []

    def mechanisms(self, tls):
        """The mechanisms to advertise (upper case) in a session with or without TLS."""
        if (self._pam or self._program) and not tls and not self._without_tls:
            return []
        supported = self.supported()
        allow, deny = _lists(self._config, tls)
        order = supported if allow is None else [m for m in allow if m in supported]
        if self._tls_only and not tls:
            deny = list(deny) + list(CLEAR_TEXT)
        return [m for m in order if m not in deny]

    def clear_text_allowed(self, tls):
        """True when a password may be sent as it is (POP USER/PASS) in this session."""
        return tls or not self._tls_only

    def trusted(self, ip):
        """The trusted-address keyword for client `ip`, or None (always None with PAM)."""
        return None if self._pam or self._program else self.secrets().trusted(ip)

    def start(self, mechanism, initial_response=None, tls=False):
        """Begins an exchange; raises MechanismError if `mechanism` is not offered.

        `initial_response` is the RFC 4954 initial response as sent (base64,
        `=` for empty), or None.
        """
        mech = mechanism.upper()
        if mech not in self.mechanisms(tls):
            raise MechanismError("mechanism %s not available" % mechanism)
        return SaslExchange(self, mech, initial_response)

    def check_password(self, user, password):
        """True when `user` may log in with `password` (for POP USER/PASS)."""
        if self._pam:
            return pam.authenticate(user, password)
        if self._program:
            return self._source.check(user, password)
        secret = self.secrets().server_secret(user)
        if secret is None:
            return False
        pw = password.encode("utf-8", "surrogateescape")
        if secret.kind == "md5":
            return hmac.compare_digest(md5state.hmac_md5_state(pw), secret.state)
        return hmac.compare_digest(pw, secret.password.encode("utf-8", "surrogateescape"))

    def _challenge(self):
        if self._domain is None:
            self._domain = socket.gethostname() or "localhost"  # no DNS look-up here
        return ("<%d.%d@%s>" % (int.from_bytes(os.urandom(8), "big"), int(time.time()),
                                self._domain)).encode("ascii", "replace")

    def _cram_ok(self, mech, user, digest, challenge):
        secret = self.secrets().server_secret(user)
        if secret is None:
            return False
        if secret.kind == "md5":
            if mech != "CRAM-MD5":
                return False
            expected = md5state.cram_md5_from_state(secret.state, challenge)
        else:
            key = secret.password.encode("utf-8", "surrogateescape")
            expected = hmac.new(key, challenge, CRAM[mech]).hexdigest()
        return hmac.compare_digest(expected, digest.lower())


class SaslExchange:
    """One AUTH exchange; see the module docstring for the step() protocol.

    `mechanism` is the upper-case name; `user` is the name the client gave
    (set once known, also on failure, for logging).
    """

    def __init__(self, auth, mechanism, initial_response):
        self.auth = auth
        self.mechanism = mechanism
        self.user = None
        self._initial = initial_response
        self._gen = None

    def step(self, client_response):
        """Feeds one client line (None for the first call); returns the next action."""
        try:
            if self._gen is None:
                initial = None
                if self._initial is not None:
                    if self._initial.strip() in ("*", b"*"):
                        return ("fail", CANCELLED)
                    initial = _b64decode(self._initial)
                self._gen = self._run(initial)
                challenge = next(self._gen)
            else:
                if client_response is None or client_response.strip() in ("*", b"*"):
                    return ("fail", CANCELLED)
                challenge = self._gen.send(_b64decode(client_response))
        except (binascii.Error, ValueError):
            return ("fail", "invalid base64 data")
        except StopIteration as done:
            return done.value
        return ("challenge", base64.b64encode(challenge))

    def _run(self, initial):
        """Generator: yields raw challenges, receives raw responses, returns the result."""
        if self.mechanism == "PLAIN":
            response = (yield b"") if initial is None else initial
            parts = response.split(b"\0")
            if len(parts) != 3:
                return ("fail", "malformed PLAIN response")
            authzid, user, password = (_text(p) for p in parts)
            self.user = user
            if authzid not in ("", user):
                return ("fail", "authorization identity not permitted")
            return self._password_result(user, password)
        if self.mechanism == "LOGIN":
            user = _text((yield b"Username:") if initial is None else initial)
            self.user = user
            password = _text((yield b"Password:"))
            return self._password_result(user, password)
        if initial is not None:
            return ("fail", "%s does not take an initial response" % self.mechanism)
        challenge = self.auth._challenge()
        response = _text((yield challenge))
        user, _, digest = response.rpartition(" ")
        self.user = user
        if user and self.auth._cram_ok(self.mechanism, user, digest, challenge):
            return ("ok", user)
        return ("fail", FAILED)

    def _password_result(self, user, password):
        if user and self.auth.check_password(user, password):
            return ("ok", user)
        return ("fail", FAILED)


# -- client side -------------------------------------------------------------

class ClientAuth:
    """Client-side AUTH with one `secrets.Secret` (kind plain, md5 or oauth).

    `user` is the account name (for logging and `MAIL FROM ... AUTH=`).
    """

    def __init__(self, secret, config_text=None):
        self.secret = secret
        self.user = secret.user
        self._config = parse_config(config_text)

    def usable(self):
        """What this secret can do, strongest first."""
        if self.secret.kind == "oauth":
            return ["XOAUTH2"]
        if self.secret.kind == "md5":
            return ["CRAM-MD5"]
        return list(PLAIN_SECRET_MECHANISMS)

    def choose(self, server_mechs, tls=False):
        """The mechanism to use with a server offering `server_mechs`, or None."""
        offered = {m.upper() for m in server_mechs}
        prefer, deny = _lists(self._config, tls)
        usable = self.usable()
        order = [m for m in (prefer or []) if m in usable] + usable
        for mech in order:
            if mech in offered and mech not in deny:
                return mech
        return None

    def responses(self, mechanism):
        """Generator of raw (not base64) responses for `mechanism`.

        The first next() gives the initial response (bytes) or None when the
        mechanism waits for a challenge; then each send(challenge) gives the
        response to that raw server challenge.
        """
        s = self.secret
        user = s.user.encode("utf-8", "surrogateescape")
        if mechanism == "XOAUTH2":
            # A 334 here carries the server's error details; an empty line ends it.
            yield b"user=" + user + b"\x01auth=Bearer " + s.password.encode("ascii", "replace") + b"\x01\x01"
            yield b""
            return
        if s.kind == "md5":
            challenge = yield None
            yield user + b" " + md5state.cram_md5_from_state(s.state, challenge).encode("ascii")
            return
        password = s.password.encode("utf-8", "surrogateescape")
        if mechanism == "PLAIN":
            yield b"\0" + user + b"\0" + password
        elif mechanism == "LOGIN":
            yield None
            yield user
            yield password
        else:
            challenge = yield None
            yield user + b" " + hmac.new(password, challenge, CRAM[mechanism]).hexdigest().encode("ascii")

    def authenticate(self, smtp, tls=False):
        """Authenticates on `smtp` (an smtplib.SMTP after EHLO, and STARTTLS if used).

        Returns the mechanism used; raises ClientAuthError when the server has
        no AUTH, there is no common mechanism, or the server refuses.
        """
        if not smtp.has_extn("auth"):
            raise ClientAuthError("the server does not support authentication (no AUTH in its EHLO reply)")
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        mech = self.choose(offered, tls)
        if mech is None:
            raise ClientAuthError("no common authentication mechanism: the server offers %s, we can use %s"
                                  % (" ".join(offered) or "none", " ".join(self._allowed(tls)) or "none"))
        gen = self.responses(mech)
        initial = next(gen)
        if initial is None:
            code, reply = smtp.docmd("AUTH", mech)
        else:
            code, reply = smtp.docmd("AUTH", mech + " " + (base64.b64encode(initial).decode("ascii") or "="))
        rounds = 0
        while code == 334 and rounds < _MAX_ROUNDS:
            rounds += 1
            try:
                answer = gen.send(base64.b64decode(reply.strip() or b"", validate=False))
                line = base64.b64encode(answer).decode("ascii")
            except StopIteration:
                line = "*"
            code, reply = smtp.docmd(line)
        if code != 235:
            raise ClientAuthError("authentication as %s with %s refused: %d %s"
                                  % (self.user, mech, code, _text(reply).replace("\n", " ")))
        return mech

    def _allowed(self, tls):
        _, deny = _lists(self._config, tls)
        return [m for m in self.usable() if m not in deny]
