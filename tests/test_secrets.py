"""secrets: E-MailRelay's secrets-file format, trusted addresses, reloading."""

import os

import pytest

from emailrelay.auth import md5state, secrets

REFERENCE = """\
#
# emailrelay secrets file
#
client plain bob password123
server plain alice e+3Dmc2
server plain carol my+20password
"""

REFERENCE_MD5 = """\
CLIENT MD5 bob OvTdiEWFV6ru0pDltV2rfsKUfTWwNken2+tV5ZqlvuOh
Server Md5 alice Or9RzqbiyG274KCY4bnnqKsH77SKdgvoDANvOZHvscaM
server md5 carol OselCSkBfX+x34UtTPj1uLPK1yKE/i/lqKi8/qwcEim8
"""

TRUSTED = """\
server none 192.168.0.* localipv4
server none 10.1.0.0/16 net10
server none fe80::/64 localipv6
server none 2001:db8::1 one
server plain alice e+3Dmc2
"""


def write(tmp_path, text, name="auth"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_reference_plain_example(tmp_path):
    s = secrets.Secrets.load(write(tmp_path, REFERENCE))
    assert s.server_secret("alice").password == "e=mc2"
    assert s.server_secret("carol").password == "my password"
    assert s.server_secret("Alice") is None
    c = s.client_secret()
    assert (c.kind, c.user, c.password) == ("plain", "bob", "password123")
    assert s.has_server() and s.has_client()


def test_reference_md5_example(tmp_path):
    s = secrets.Secrets.load(write(tmp_path, REFERENCE_MD5))
    assert s.server_secret("alice").kind == "md5"
    assert s.server_secret("alice").state == md5state.hmac_md5_state(b"e=mc2")
    assert s.client_secret().state == md5state.hmac_md5_state(b"password123")
    assert s.server_kinds() == {"md5"}


def test_passwd_output_and_xtext_user(tmp_path):
    text = "server md5 j+C3+A9r+20x %s\n" % md5state.encode_state("pw")
    s = secrets.Secrets.load(write(tmp_path, text))
    assert s.server_secret("jér x").state == md5state.hmac_md5_state(b"pw")


def test_oauth_and_selector_and_plain_b(tmp_path):
    text = ("client oauth me@gmail.com ya29.token-text\n"
            "client plain other pw2 sel1\n"
            "server plain:b Ym9i c2VjcmV0IHB3\n")
    s = secrets.Secrets.load(write(tmp_path, text))
    assert (s.client_secret().kind, s.client_secret().password) == ("oauth", "ya29.token-text")
    assert s.client_secret("sel1").user == "other"
    assert s.client_secret("nope") is None
    assert s.server_secret("bob").password == "secret pw"


@pytest.mark.parametrize("ip,keyword", [
    ("192.168.0.7", "localipv4"), ("::ffff:192.168.0.9", "localipv4"),
    ("10.1.200.3", "net10"), ("fe80::1234", "localipv6"), ("2001:db8::1", "one"),
    ("192.168.1.7", None), ("10.2.0.1", None), ("fe80:1::1", None), ("2001:db8::2", None),
    ("127.0.0.1", None), ("not-an-ip", None),
])
def test_trusted(tmp_path, ip, keyword):
    s = secrets.Secrets.load(write(tmp_path, TRUSTED))
    assert s.trusted(ip) == keyword


def test_trusted_lines_are_not_accounts(tmp_path):
    s = secrets.Secrets.load(write(tmp_path, "server none 127.0.0.1 me\n"))
    assert not s.has_server() and s.trusted("127.0.0.1") == "me"


@pytest.mark.parametrize("line,what", [
    ("server plain alice", "four fields"),
    ("server plain alice pw extra", "four fields"),
    ("client plain a b c d", "four or five"),
    ("peer plain alice pw", "first field"),
    ("server sha1 alice pw", "second field"),
    ("server oauth alice tok", "second field"),
    ("client none 1.2.3.4 x", "second field"),
    ("server md5 alice notastate", "md5"),
    ("server none 192.168.0.300 x", "invalid address pattern"),
    ("server none 192.168.* x", "invalid address pattern"),
    ("server none fe80::/200 x", "invalid address pattern"),
    ("server plain:b !!! x", "base64"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, what):
    path = write(tmp_path, "# comment\n\nserver plain ok pw\n" + line + "\n")
    with pytest.raises(secrets.SecretsError) as e:
        secrets.Secrets.load(path)
    assert str(e.value).startswith("%s:4: " % path)
    assert what in str(e.value)


def test_duplicates_are_errors(tmp_path):
    with pytest.raises(secrets.SecretsError, match=":2: second server entry"):
        secrets.Secrets.load(write(tmp_path, "server plain a x\nserver md5 a %s\n"
                                   % md5state.encode_state("y")))
    with pytest.raises(secrets.SecretsError, match=":2: second client entry"):
        secrets.Secrets.load(write(tmp_path, "client plain a x\nclient plain b y\n"))


def test_unreadable_file(tmp_path):
    path = str(tmp_path / "missing")
    with pytest.raises(secrets.SecretsError) as e:
        secrets.Secrets.load(path)
    assert path in str(e.value) and "No such file" in str(e.value)


def test_reload_keeps_old_on_failure(tmp_path):
    path = write(tmp_path, "server plain alice one\n")
    holder = secrets.Reloadable(path)
    assert holder.get().server_secret("alice").password == "one"
    with open(path, "w") as f:
        f.write("server plain alice two\n")
    holder.reload()
    assert holder.get().server_secret("alice").password == "two"
    with open(path, "w") as f:
        f.write("server plain alice\n")
    with pytest.raises(secrets.SecretsError):
        holder.reload()
    assert holder.get().server_secret("alice").password == "two"
    os.unlink(path)
    with pytest.raises(secrets.SecretsError):
        holder.reload()
    assert holder.get().server_secret("alice").password == "two"


def test_legacy_mechanism_words(tmp_path):
    """Older E-MailRelay files: login is plain, cram-md5 and apop are md5."""
    text = ("server LOGIN alice e+3Dmc2\n"
            "server cram-md5 bob Or9RzqbiyG274KCY4bnnqKsH77SKdgvoDANvOZHvscaM\n"
            "server APOP carol OselCSkBfX+x34UtTPj1uLPK1yKE/i/lqKi8/qwcEim8\n"
            "client login dave pw\n")
    s = secrets.Secrets.load(write(tmp_path, text))
    assert (s.server_secret("alice").kind, s.server_secret("alice").password) == ("plain", "e=mc2")
    assert s.server_secret("bob").state == md5state.hmac_md5_state(b"e=mc2")
    assert s.server_secret("carol").kind == "md5"
    assert (s.client_secret().kind, s.client_secret().password) == ("plain", "pw")


def test_legacy_login_line_authenticates_through_the_program(tmp_path):
    import smtplib
    from helpers import Relay
    path = write(tmp_path, "server login alice secret\nserver cram-md5 bob %s\n"
                 % md5state.encode_state("bob-pw"))
    with Relay(tmp_path, ["--server-auth", path]) as relay:
        for user, password, mechanism in (("alice", "secret", "PLAIN"), ("bob", "bob-pw", "CRAM-MD5")):
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
                c.ehlo("client.test")
                c.user, c.password = user, password
                code = c.auth(mechanism, getattr(c, "auth_" + mechanism.lower().replace("-", "_")),
                              initial_response_ok=False)[0]
                assert code == 235, (user, mechanism)
