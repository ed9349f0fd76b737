"""filters: E-MailRelay's filter-program interface, run for real."""

import json
import os
import stat
import sys
import time

import pytest

from emailrelay.policy import filters
from helpers import alive, wait_for


@pytest.fixture
def script(tmp_path):
    """Writes an executable shell script and returns its path."""
    def make(body, name="filter.sh"):
        path = tmp_path / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return str(path)
    return make


@pytest.fixture
def content(tmp_path):
    path = tmp_path / "emailrelay.1.2.3.content"
    path.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    return str(path)


def run(spec, content_path, timeout=10, **kw):
    envelope_path = content_path.replace("content", "envelope.new")
    return filters.make(spec, timeout, **kw).run(content_path, envelope_path)


def test_ok_and_content_then_envelope_path_are_the_arguments(script, content, tmp_path):
    out = tmp_path / "args"
    r = run(script('printf "%%s\\n" "$@" > %s\nexit 0\n' % out), content)
    assert (r.ok, r.code, r.special, r.reason, r.temporary) == (True, 0, None, "", False)
    assert out.read_text().splitlines() == [content, content.replace("content", "envelope.new")]


def test_a_program_with_arguments_gets_the_content_path_only(script, content, tmp_path):
    # The user guide's --filter="/usr/bin/spamassassin -e": one message file.
    out = tmp_path / "args"
    r = run(script('printf "%%s\\n" "$@" > %s\nexit 0\n' % out) + " -a one\\ arg", content)
    assert r.ok
    assert out.read_text().splitlines() == ["-a", "one arg", content]


@pytest.mark.parametrize("code", [1, 50, 99])
def test_reject_with_default_reason(script, content, code):
    r = run(script("echo some noise\nexit %d\n" % code), content)
    assert (r.ok, r.code, r.reason, r.temporary, r.special) == (False, code, "rejected", False, None)


@pytest.mark.parametrize("line,reason", [("<<no spam here>>", "no spam here"),
                                         ("[[virus found]]", "virus found"),
                                         ("<<a>> trailing", "a")])
def test_reject_reason_from_output(script, content, line, reason):
    r = run(script("echo first line\necho '%s'\necho '<<second>>'\nexit 1\n" % line), content)
    assert r.reason == reason and not r.ok


def test_reason_is_cleaned_of_control_characters(script, content):
    r = run(script("printf '<<bad\\rthing\\007here>>\\n'\nexit 2\n"), content)
    assert r.reason == "bad thing here"


def test_cancel_is_not_an_error_even_if_files_are_gone(script, content):
    r = run(script('rm -f "$1"\nexit 100\n'), content)
    assert not os.path.exists(content)
    assert (r.ok, r.special, r.cancel, r.temporary) == (False, "cancel", True, False)


def test_server_special_codes(script, content):
    r = run(script("exit 103\n"), content)
    assert r.ok and r.special == "rescan"
    r = run(script("exit 102\n"), content)
    assert r.special == "cancel" and r.rescan
    r = run(script("echo '<<later>>'\nexit 104\n"), content)
    assert not r.ok and r.reason == "later" and r.rescan
    r = run(script("exit 101\n"), content)
    assert r.ok and r.special is None
    r = run(script("exit 120\n"), content)
    assert not r.ok and r.reason == "rejected" and r.code == 120


@pytest.mark.parametrize("code,ok,special", [(0, True, None), (100, False, "cancel"), (101, True, None),
                                             (102, True, "stop"), (103, True, None),
                                             (104, False, "cancel"), (105, True, "stop"),
                                             (7, False, None)])
def test_client_filter_codes(code, ok, special, content):
    r = run("exit:%d" % code, content, kind="client")
    assert (r.ok, r.special) == (ok, special)
    assert r.stop == (code in (102, 104, 105))


def test_exit_emulation(content):
    assert run("exit:0", content).ok
    r = run("exit:3", content)
    assert (r.ok, r.code, r.reason) == (False, 3, "rejected")
    assert run("exit:100", content).special == "cancel"
    for bad in ("exit:", "exit:x", "exit:256", "exit:-1"):
        with pytest.raises(ValueError):
            filters.make(bad, 10)


@pytest.mark.parametrize("spec,cls,where", [
    ("net:127.0.0.1:1234", filters.NetFilter, ("127.0.0.1", 1234)),
    ("net:[::1]:1234", filters.NetFilter, ("::1", 1234)),
    ("net:localhost:1234", filters.NetFilter, ("localhost", 1234)),
    ("net:/run/filter.sock", filters.NetFilter, "/run/filter.sock"),
    ("spam:localhost:783", filters.SpamFilter, ("localhost", 783)),
    ("spam-edit:127.0.0.1:783", filters.SpamFilter, ("127.0.0.1", 783))])
def test_network_forms(spec, cls, where):
    f = filters.make(spec, 10)
    assert isinstance(f, cls)
    location = f.client.location if cls is filters.NetFilter else f.location
    assert location.address == where
    if cls is filters.SpamFilter:
        assert f.edit == spec.startswith("spam-edit:")


@pytest.mark.parametrize("spec", ["net:", "net:127.0.0.1", "spam:host:notaport", "spam-edit:"])
def test_bad_network_forms(spec):
    with pytest.raises(ValueError, match="--client-filter " + spec):
        filters.make(spec, 10, kind="client")


def test_bad_specs():
    for bad in ("", "   ", "'unbalanced"):
        with pytest.raises(ValueError):
            filters.make(bad, 10)


def test_timeout_kills_the_process_group(script, content, tmp_path):
    pids = tmp_path / "pids"
    spec = script('sleep 30 &\necho $! > %s\necho $$ >> %s\nwait\n' % (pids, pids))
    start = time.monotonic()
    r = run(spec, content, timeout=1)
    assert time.monotonic() - start < 5
    assert (r.ok, r.temporary, r.code, r.reason) == (False, True, None, "filter timed out")
    for pid in map(int, pids.read_text().split()):
        # SIGKILL is delivered at once but the exit completes asynchronously.
        wait_for(lambda: not alive(pid), timeout=5, what="process %d to die" % pid)


def test_crash_is_temporary(script, content):
    r = run(script("kill -SEGV $$\n"), content)
    assert (r.ok, r.temporary, r.code, r.reason) == (False, True, None, "filter crashed")


def test_missing_and_not_executable(content, tmp_path):
    r = run(str(tmp_path / "no-such-filter"), content)
    assert r.temporary and not r.ok and "no-such-filter" in r.reason
    plain = tmp_path / "not-exec.sh"
    plain.write_text("#!/bin/sh\nexit 0\n")
    r = run(str(plain), content)
    assert r.temporary and "Permission denied" in r.reason


def test_environment_and_descriptors(content, tmp_path):
    out = tmp_path / "seen.json"
    prog = tmp_path / "filter.py"
    prog.write_text("#!%s\nimport json, os, sys\n"
                    "json.dump({'env': dict(os.environ), 'fds': os.listdir('/proc/self/fd'),"
                    " 'stdin': sys.stdin.read(), 'stderr': os.readlink('/proc/self/fd/2')},"
                    " open(%r, 'w'))\n" % (sys.executable, str(out)))
    prog.chmod(0o755)
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_w, True)
    os.environ["EMAILRELAY_SECRET_TEST"] = "leak"
    try:
        r = run(str(prog), content)
    finally:
        del os.environ["EMAILRELAY_SECRET_TEST"]
        os.close(leak_r)
        os.close(leak_w)
    assert r.ok
    seen = json.loads(out.read_text())
    assert set(seen["env"]) - {"LC_CTYPE"} == {"PATH", "IFS"}  # Python itself may add LC_CTYPE
    assert set(seen["fds"]) <= {"0", "1", "2", "3"}  # 3: the directory listdir opened
    assert seen["stdin"] == "" and seen["stderr"] == "/dev/null"


def test_metacharacters_and_crlf_reach_the_program_as_plain_arguments(script, content, tmp_path):
    out = tmp_path / "args"
    marker = tmp_path / "pwned"
    evil = "$(touch %s);`touch %s`|&<>*\r\nRCPT TO:<x>" % (marker, marker)
    f = filters.Filter("x", [script('printf "%%s\\0" "$@" > %s\n' % out)], None, 10, "server")
    r = f.run(evil, evil)
    assert r.ok
    assert out.read_bytes().split(b"\0")[0] == evil.encode()
    assert not marker.exists()


def test_large_output_is_bounded(script, content):
    r = run(script("yes '<<first>>' | head -c 1000000\nexit 5\n"), content)
    assert r.reason == "first"


def test_background_child_holding_stdout_does_not_block(script, content):
    start = time.monotonic()
    r = run(script("sleep 5 &\nexit 0\n"), content, timeout=20)
    assert r.ok and time.monotonic() - start < 2


def test_relay_passes_content_and_envelope_paths_to_server_and_client_filters(script, tmp_path):
    import smtplib
    from helpers import Relay, run_emailrelay, smtp_sink, stop_process, free_port
    seen = tmp_path / "seen"
    spec = script('echo "$#|$1|$2" >> %s\ntest -f "$2" || exit 1\nexit 0\n' % seen, name="args.sh")
    with Relay(tmp_path, ["--filter", spec]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as s:
            s.sendmail("a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nhi\r\n")
        [name] = relay.files(".envelope")
    base = os.path.join(relay.spool, name[:-len(".envelope")])
    assert seen.read_text().splitlines() == ["2|%s.content|%s.envelope.new" % (base, base)]
    port = free_port()
    sink = smtp_sink(port)
    try:
        r = run_emailrelay(["--as-client", "127.0.0.1:%d" % port, "--user", "root", "--spool-dir", relay.spool,
                            "--client-filter", spec])
    finally:
        stop_process(sink)
    assert r.returncode == 0, r.stderr
    assert seen.read_text().splitlines()[1] == "2|%s.content|%s.envelope.busy" % (base, base)
