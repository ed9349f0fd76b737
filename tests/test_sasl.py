"""sasl: server mechanisms and policy, client choice, against smtplib and swaks.

A tiny SMTP responder in this file (EHLO, AUTH, QUIT only) drives
`ServerAuth` through a real socket so that real clients can log in to it.
"""

import base64
import hmac
import socketserver
import smtplib
import subprocess
import threading

import pytest

from emailrelay.auth import md5state, sasl, secrets

SECRETS = secrets.Secrets.parse(
    "server plain alice e+3Dmc2\n"
    "server md5 bob %s\n"
    "server plain j+C3+A9r p+C3+A4ss\n"
    "server none 192.168.0.* lan\n" % md5state.encode_state("foobar"))
MD5_ONLY = secrets.Secrets.parse("server md5 bob %s\n" % md5state.encode_state("foobar"))


def b64(data):
    return base64.b64encode(data)


def run_exchange(auth, mech, responses, initial=None, tls=False):
    """Runs one exchange; `responses(challenge_bytes)` gives raw client data."""
    ex = auth.start(mech, initial, tls=tls)
    result = ex.step(None)
    rounds = 0
    while result[0] == "challenge":
        rounds += 1
        assert rounds < 5
        result = ex.step(b64(responses(base64.b64decode(result[1]))))
    return result


# -- server policy -----------------------------------------------------------

def test_default_mechanisms():
    auth = sasl.ServerAuth(SECRETS)
    assert auth.mechanisms(False) == ["CRAM-SHA256", "CRAM-SHA1", "CRAM-MD5", "PLAIN", "LOGIN"]
    assert auth.mechanisms(True) == auth.mechanisms(False)
    assert sasl.ServerAuth(MD5_ONLY).mechanisms(False) == ["CRAM-MD5"]
    assert sasl.ServerAuth(secrets.Secrets.parse("server none 1.2.3.4 x\n")).mechanisms(True) == []


@pytest.mark.parametrize("config,before,after", [
    ("m:;a:plain", [], ["PLAIN"]),
    ("m:cram-md5,plain", ["CRAM-MD5", "PLAIN"], ["CRAM-MD5", "PLAIN"]),
    ("x:plain,login", ["CRAM-SHA256", "CRAM-SHA1", "CRAM-MD5"], ["CRAM-SHA256", "CRAM-SHA1", "CRAM-MD5"]),
    ("x:plain,login;d:cram-sha1", ["CRAM-SHA256", "CRAM-SHA1", "CRAM-MD5"],
     ["CRAM-SHA256", "CRAM-MD5", "PLAIN", "LOGIN"]),
    ("m:login,cram-md5", ["LOGIN", "CRAM-MD5"], ["LOGIN", "CRAM-MD5"]),
])
def test_config(config, before, after):
    auth = sasl.ServerAuth(SECRETS, config)
    assert auth.mechanisms(False) == before
    assert auth.mechanisms(True) == after


@pytest.mark.parametrize("bad", ["q:plain", "plain", "m:plain;x:digest-md5"])
def test_bad_config(bad):
    with pytest.raises(ValueError):
        sasl.ServerAuth(SECRETS, bad)


def test_mechanism_not_offered():
    auth = sasl.ServerAuth(SECRETS, "m:;a:plain")
    with pytest.raises(sasl.MechanismError):
        auth.start("PLAIN", None, tls=False)
    with pytest.raises(sasl.MechanismError):
        auth.start("GSSAPI")
    assert auth.start("plain", None, tls=True).mechanism == "PLAIN"


def test_pam_policy():
    auth = sasl.ServerAuth(secrets.PAM_PATH)
    assert auth.mechanisms(False) == [] and auth.mechanisms(True) == ["PLAIN"]
    assert auth.trusted("192.168.0.1") is None
    with pytest.raises(sasl.MechanismError):
        auth.start("PLAIN")


def test_trusted_via_auth():
    assert sasl.ServerAuth(SECRETS).trusted("::ffff:192.168.0.4") == "lan"


def test_reloadable_source(tmp_path):
    path = tmp_path / "auth"
    path.write_text("server md5 bob %s\n" % md5state.encode_state("x"))
    holder = secrets.Reloadable(str(path))
    auth = sasl.ServerAuth(holder)
    assert auth.mechanisms(False) == ["CRAM-MD5"]
    path.write_text("server plain bob x\n")
    holder.reload()
    assert "PLAIN" in auth.mechanisms(False)


# -- server exchanges ----------------------------------------------------------

def test_plain_initial_and_challenge():
    auth = sasl.ServerAuth(SECRETS)
    assert run_exchange(auth, "PLAIN", None, initial=b64(b"\0alice\0e=mc2")) == ("ok", "alice")
    assert run_exchange(auth, "PLAIN", lambda c: b"alice\0alice\0e=mc2") == ("ok", "alice")
    assert run_exchange(auth, "PLAIN", None, initial=b64(b"\0alice\0wrong")) == ("fail", sasl.FAILED)
    assert run_exchange(auth, "PLAIN", None, initial=b64(b"bob\0alice\0e=mc2"))[0] == "fail"
    assert run_exchange(auth, "PLAIN", None, initial=b64(b"\0nobody\0e=mc2")) == ("fail", sasl.FAILED)
    assert run_exchange(auth, "PLAIN", None, initial=b64(b"no-nuls"))[0] == "fail"
    # An md5 secret can check a PLAIN password too.
    assert run_exchange(auth, "PLAIN", None, initial=b64(b"\0bob\0foobar")) == ("ok", "bob")
    # UTF-8 names and passwords from xtext.
    assert run_exchange(auth, "PLAIN", None, initial=b64("\0jér\0päss".encode())) == ("ok", "jér")


def test_login_prompts_and_initial_response():
    auth = sasl.ServerAuth(SECRETS)
    seen = []

    def answer(challenge):
        seen.append(challenge)
        return b"alice" if challenge == b"Username:" else b"e=mc2"
    assert run_exchange(auth, "LOGIN", answer) == ("ok", "alice")
    assert seen == [b"Username:", b"Password:"]
    assert run_exchange(auth, "LOGIN", lambda c: b"e=mc2", initial=b64(b"alice")) == ("ok", "alice")
    assert run_exchange(auth, "LOGIN", lambda c: b"x", initial=b64(b"alice")) == ("fail", sasl.FAILED)


@pytest.mark.parametrize("mech,digest", [("CRAM-MD5", "md5"), ("CRAM-SHA1", "sha1"),
                                         ("CRAM-SHA256", "sha256")])
def test_cram_with_plain_secret(mech, digest):
    auth = sasl.ServerAuth(SECRETS, domain="relay.example")
    challenges = []

    def answer(challenge):
        challenges.append(challenge)
        return b"alice " + hmac.new(b"e=mc2", challenge, digest).hexdigest().encode()
    assert run_exchange(auth, mech, answer) == ("ok", "alice")
    assert run_exchange(auth, mech, answer) == ("ok", "alice")
    assert challenges[0] != challenges[1]
    assert challenges[0].startswith(b"<") and challenges[0].endswith(b"@relay.example>")
    wrong = run_exchange(auth, mech, lambda c: b"alice " + hmac.new(b"x", c, digest).hexdigest().encode())
    assert wrong == ("fail", sasl.FAILED)


def test_cram_md5_with_md5_secret_uses_smtplib_client():
    """smtplib's own CRAM-MD5 answer verifies against the stored md5 state."""
    auth = sasl.ServerAuth(SECRETS)
    client = smtplib.SMTP()
    client.user, client.password = "bob", "foobar"
    assert run_exchange(auth, "CRAM-MD5", lambda c: client.auth_cram_md5(c).encode()) == ("ok", "bob")
    client.password = "foobaz"
    assert run_exchange(auth, "CRAM-MD5", lambda c: client.auth_cram_md5(c).encode()) == ("fail", sasl.FAILED)


def test_cram_sha_refused_for_md5_secret():
    auth = sasl.ServerAuth(SECRETS)
    answer = lambda c: b"bob " + hmac.new(b"foobar", c, "sha1").hexdigest().encode()  # noqa: E731
    assert run_exchange(auth, "CRAM-SHA1", answer) == ("fail", sasl.FAILED)


def test_cancel_and_bad_base64():
    auth = sasl.ServerAuth(SECRETS)
    ex = auth.start("LOGIN")
    assert ex.step(None)[0] == "challenge"
    assert ex.step(b"*") == ("fail", sasl.CANCELLED)
    assert auth.start("PLAIN", "*").step(None) == ("fail", sasl.CANCELLED)
    ex = auth.start("CRAM-MD5")
    ex.step(None)
    assert ex.step(b"%%%not base64") == ("fail", "invalid base64 data")
    assert auth.start("CRAM-MD5", b64(b"x")).step(None)[0] == "fail"
    assert run_exchange(auth, "PLAIN", None, initial="=")[0] == "fail"


def test_check_password():
    auth = sasl.ServerAuth(SECRETS)
    assert auth.check_password("alice", "e=mc2") and not auth.check_password("alice", "e=mc3")
    assert auth.check_password("bob", "foobar") and not auth.check_password("bob", "foobaz")
    assert not auth.check_password("nobody", "")


# -- client choice -------------------------------------------------------------

PLAIN_SECRET = secrets.Secret("plain", "alice", password="e=mc2")
MD5_SECRET = secrets.Secret("md5", "bob", state=md5state.hmac_md5_state(b"foobar"))
OAUTH_SECRET = secrets.Secret("oauth", "me@example.com", password="tok")


@pytest.mark.parametrize("secret,config,offered,tls,expected", [
    (PLAIN_SECRET, None, ["PLAIN", "LOGIN", "CRAM-MD5"], False, "CRAM-MD5"),
    (PLAIN_SECRET, None, ["PLAIN", "LOGIN", "CRAM-SHA256", "CRAM-SHA1"], False, "CRAM-SHA256"),
    (PLAIN_SECRET, None, ["login", "plain"], False, "PLAIN"),
    (PLAIN_SECRET, None, ["LOGIN", "XOAUTH2"], False, "LOGIN"),
    (PLAIN_SECRET, None, ["GSSAPI"], False, None),
    (PLAIN_SECRET, "m:login", ["PLAIN", "LOGIN", "CRAM-MD5"], False, "LOGIN"),
    (PLAIN_SECRET, "x:cram-md5", ["PLAIN", "CRAM-MD5"], False, "PLAIN"),
    (PLAIN_SECRET, "x:plain,login", ["PLAIN", "LOGIN"], False, None),
    (PLAIN_SECRET, "x:plain;a:plain", ["PLAIN", "CRAM-MD5"], True, "PLAIN"),
    (PLAIN_SECRET, "x:plain;a:plain", ["PLAIN"], False, None),
    (MD5_SECRET, None, ["PLAIN", "LOGIN", "CRAM-MD5", "CRAM-SHA256"], False, "CRAM-MD5"),
    (MD5_SECRET, None, ["PLAIN", "LOGIN"], False, None),
    (OAUTH_SECRET, None, ["PLAIN", "XOAUTH2"], False, "XOAUTH2"),
    (OAUTH_SECRET, None, ["PLAIN", "LOGIN"], False, None),
])
def test_client_choose(secret, config, offered, tls, expected):
    assert sasl.ClientAuth(secret, config).choose(offered, tls) == expected


def test_client_responses_verify_on_server():
    auth = sasl.ServerAuth(SECRETS)
    for secret, mechs in ((PLAIN_SECRET, ["CRAM-SHA256", "CRAM-SHA1", "CRAM-MD5", "PLAIN", "LOGIN"]),
                          (MD5_SECRET, ["CRAM-MD5"])):
        for mech in mechs:
            gen = sasl.ClientAuth(secret).responses(mech)
            initial = next(gen)
            result = run_exchange(auth, mech, gen.send,
                                  initial=None if initial is None else b64(initial))
            assert result == ("ok", secret.user), mech


def test_xoauth2_initial_response():
    gen = sasl.ClientAuth(OAUTH_SECRET).responses("XOAUTH2")
    assert next(gen) == b"user=me@example.com\x01auth=Bearer tok\x01\x01"
    assert gen.send(b'{"status":"401"}') == b""


# -- real clients against a tiny responder ---------------------------------------

class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        auth = self.server.auth
        self.wfile.write(b"220 test ESMTP\r\n")
        for line in self.rfile:
            words = line.decode().strip().split()
            verb = words[0].upper() if words else ""
            if verb in ("EHLO", "HELO"):
                mechs = auth.mechanisms(self.server.tls)
                self.wfile.write(b"250-test\r\n" + ("250 AUTH %s\r\n" % " ".join(mechs)).encode())
            elif verb == "AUTH":
                try:
                    ex = auth.start(words[1], words[2] if len(words) > 2 else None, tls=self.server.tls)
                except sasl.MechanismError:
                    self.wfile.write(b"504 5.5.4 unrecognized authentication type\r\n")
                    continue
                result = ex.step(None)
                while result[0] == "challenge":
                    self.wfile.write(b"334 " + result[1] + b"\r\n")
                    result = ex.step(self.rfile.readline().strip())
                if result[0] == "ok":
                    self.wfile.write(b"235 2.7.0 authenticated as " + result[1].encode() + b"\r\n")
                elif result[1] == sasl.CANCELLED:
                    self.wfile.write(b"501 5.7.0 cancelled\r\n")
                else:
                    self.wfile.write(b"535 5.7.8 " + result[1].encode() + b"\r\n")
            elif verb == "QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"502 5.5.1 no\r\n")


@pytest.fixture
def responder():
    servers = []

    def start(source, config=None, tls=False):
        srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
        srv.daemon_threads = True
        srv.auth = sasl.ServerAuth(source, config)
        srv.tls = tls
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(srv)
        return srv.server_address[1]
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("config,mech", [("m:cram-md5", "CRAM-MD5"), ("m:plain", "PLAIN"),
                                         ("m:login", "LOGIN")])
def test_smtplib_login(responder, config, mech):
    port = responder(SECRETS, config)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        code, text = c.login("alice", "e=mc2")
        assert code == 235 and b"alice" in text
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("alice", "wrong")
        assert e.value.smtp_code == 535


def test_smtplib_cram_md5_against_md5_secret(responder):
    port = responder(MD5_ONLY)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        assert c.login("bob", "foobar")[0] == 235


@pytest.mark.parametrize("secret,config,expected", [
    (PLAIN_SECRET, None, "CRAM-SHA256"), (PLAIN_SECRET, "m:login", "LOGIN"),
    (PLAIN_SECRET, "x:cram-sha256,cram-sha1,cram-md5", "PLAIN"), (MD5_SECRET, None, "CRAM-MD5"),
    (secrets.Secret("plain", "jér", password="päss"), "m:plain", "PLAIN"),
    (secrets.Secret("plain", "jér", password="päss"), "m:login", "LOGIN"),
])
def test_client_authenticate(responder, secret, config, expected):
    port = responder(SECRETS)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo()
        assert sasl.ClientAuth(secret, config).authenticate(c) == expected


def test_client_authenticate_failures(responder):
    port = responder(MD5_ONLY)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo()
        with pytest.raises(sasl.ClientAuthError) as e:
            sasl.ClientAuth(OAUTH_SECRET).authenticate(c)
        assert "CRAM-MD5" in str(e.value) and "XOAUTH2" in str(e.value)
        with pytest.raises(sasl.ClientAuthError) as e:
            sasl.ClientAuth(secrets.Secret("plain", "bob", password="nope")).authenticate(c)
        assert "535" in str(e.value)
    port = responder(SECRETS, "m:")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo()
        with pytest.raises(sasl.ClientAuthError, match="offers none"):
            sasl.ClientAuth(PLAIN_SECRET).authenticate(c)


@pytest.mark.parametrize("mech", ["CRAM-MD5", "PLAIN", "LOGIN"])
def test_swaks(responder, mech):
    port = responder(SECRETS)
    r = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % port, "--quit-after", "AUTH",
                        "--auth", mech, "--auth-user", "alice", "--auth-password", "e=mc2"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                       timeout=30)
    assert "235 2.7.0 authenticated as alice" in r.stdout, r.stdout
