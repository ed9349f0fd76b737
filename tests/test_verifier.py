"""verifier: E-MailRelay's address-verifier program interface, run for real."""

import stat
import time

import pytest

from emailrelay.policy import verifier


@pytest.fixture
def script(tmp_path):
    def make(body):
        path = tmp_path / "verifier.sh"
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return str(path)
    return make


def verify(spec, rcpt="bob@local.net", from_="alice@example.com", ip="192.168.0.1",
           domain="local.net", mech="login", name="alice", timeout=10):
    return verifier.make(spec, timeout).verify(rcpt, from_, ip, domain, mech, name)


def test_six_arguments_in_reference_order(script, tmp_path):
    out = tmp_path / "args"
    r = verify(script('printf "%%s\\n" "$@" > %s\necho\necho "$1"\nexit 1\n' % out))
    assert out.read_text().splitlines() == ["bob@local.net", "local.net", "alice@example.com",
                                            "192.168.0.1", "login", "alice"]
    assert (r.status, r.address) == ("remote", "bob@local.net")


def test_vrfy_and_trusted_arguments(script, tmp_path):
    out = tmp_path / "args"
    verify(script('printf "[%%s]\\n" "$@" > %s\nexit 1\n' % out), from_="", mech="none", name="lan")
    assert out.read_text().splitlines() == ["[bob@local.net]", "[local.net]", "[]", "[192.168.0.1]",
                                            "[none]", "[lan]"]


def test_local_mailbox(script):
    r = verify(script("echo Local Postmaster '<postmaster@localhost>'\necho postmaster\nexit 0\n"))
    assert (r.status, r.full_name, r.address) == ("local", "Local Postmaster <postmaster@localhost>",
                                                  "postmaster")


def test_remote_rewritten_and_default(script):
    assert verify(script("echo\necho other@remote.net\nexit 1\n")).address == "other@remote.net"
    assert verify(script("exit 1\n")).address == "bob@local.net"


def test_reject_and_tempfail(script):
    r = verify(script('echo invalid address: "$1"\nexit 2\n'))
    assert (r.status, r.reason) == ("reject", "invalid address: bob@local.net")
    r = verify(script('echo address unavailable: "$1"\nexit 3\n'))
    assert (r.status, r.reason) == ("tempfail", "address unavailable: bob@local.net")
    assert verify(script("exit 2\n")).reason == "invalid address"


def test_abort(script):
    assert verify(script("exit 100\n")).status == "abort"


@pytest.mark.parametrize("code", [4, 5, 99])
def test_other_codes_reject_with_the_output_as_reason(script, code):
    r = verify(script("echo no such list here\nexit %d\n" % code))
    assert (r.status, r.reason) == ("reject", "no such list here")


def test_crash_is_tempfail(script):
    assert verify(script("kill -KILL $$\n")).status == "tempfail"


def test_timeout_is_tempfail(script):
    start = time.monotonic()
    r = verify(script("sleep 30\n"), timeout=1)
    assert r.status == "tempfail" and "timed out" in r.reason
    assert time.monotonic() - start < 5


def test_missing_program_is_tempfail(tmp_path):
    assert verify(str(tmp_path / "nope")).status == "tempfail"


def test_reason_cannot_inject_reply_lines(script):
    r = verify(script("printf 'bad\\r\\n250 OK\\r\\n'\nexit 2\n"))
    assert "\r" not in r.reason and "\n" not in r.reason
    assert r.reason == "bad 250 OK"


def test_metacharacters_reach_the_program_as_plain_arguments(script, tmp_path):
    out = tmp_path / "args"
    marker = tmp_path / "pwned"
    evil = "x$(touch %s)`touch %s`;|&\r\nDATA@y" % (marker, marker)
    r = verify(script('printf "%%s\\0" "$@" > %s\nexit 1\n' % out), rcpt=evil, from_=evil)
    parts = out.read_bytes().split(b"\0")
    assert parts[0] == evil.encode() and parts[2] == evil.encode()
    assert not marker.exists()
    assert r.status == "remote"


def test_version_probe(script):
    v = verifier.make(script('if test $# -eq 1 ; then echo 2.0 ; exit 0 ; fi\nexit 1\n'), 10)
    assert v.version() == verifier.VERSION
    v = verifier.make(script('echo ""\necho $1\nexit 1\n'), 10)
    assert v.version() == ""


def test_mechanism_is_lower_case_and_none_without_authentication(script, tmp_path):
    out = tmp_path / "args"
    spec = script('printf "[%%s]\\n" "$5" "$6" >> %s\nexit 1\n' % out)
    verify(spec, mech="CRAM-MD5", name="alice")
    verify(spec, mech="", name="")
    assert out.read_text().splitlines() == ["[cram-md5]", "[alice]", "[none]", "[]"]


def test_net_form_and_bad_addresses():
    v = verifier.make("net:127.0.0.1:10025", 10)
    assert isinstance(v, verifier.NetVerifier)
    assert v.client.location.address == ("127.0.0.1", 10025)
    assert verifier.make("net:/run/v.sock", 10).client.location.address == "/run/v.sock"
    for bad in ("net:", "net:127.0.0.1"):
        with pytest.raises(ValueError, match="--address-verifier"):
            verifier.make(bad, 10)
