"""Automatic retry of temporary failures by the forwarding daemon.

The next hop is `ScriptedServer` (test_client), which can answer RCPT with
a 4xx and be changed while the relay runs, or be absent and start later.
Retry times come from --retry-interval (seconds), so the schedule runs in
seconds, not minutes.
"""

import os
import re
import smtplib

import helpers
from test_admin import Admin
from test_client import ScriptedServer, put_message
from emailrelay.store.envelope import Envelope

BUSY = b"452 4.3.1 insufficient system storage"


def submit(port, subject="retry"):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("a@x.test", ["b@y.test"], "Subject: %s\r\n\r\nbody\r\n" % subject)


def delivered(server):
    return [s["data"] for s in server.sessions if s["data"]]


def only_envelope(relay):
    [name] = relay.files(".envelope")
    return Envelope.read(os.path.join(relay.spool, name))


def test_452_is_retried_until_the_next_hop_recovers(tmp_path):
    server = ScriptedServer(reject={"b@y.test": BUSY})
    try:
        with helpers.Relay(tmp_path, ["--forward-on-disconnect", "--forward-to", "127.0.0.1:%d" % server.port,
                                      "--retry-interval", "2"], name="a") as a:
            submit(a.port)
            a.wait_log(r"temporary failure 1: .*452 4\.3\.1 .*: next attempt in 2s")
            state = only_envelope(a).retry()
            assert state.count == 1 and "452 4.3.1 insufficient system storage" in state.reason
            assert a.files(".bad") == []
            server.reject.clear()
            # No trigger and no --poll: the daemon retries by itself.
            helpers.wait_for(lambda: delivered(server), timeout=15, what="the retried message")
            assert b"Subject: retry" in delivered(server)[0]
            helpers.wait_for(lambda: not a.files(".envelope"), what="the spool to empty")
            assert a.files(".bad") == []
    finally:
        server.close()


def test_back_off_doubles_and_gives_up_after_the_lifetime(tmp_path):
    server = ScriptedServer(reject={"b@y.test": BUSY})
    try:
        with helpers.Relay(tmp_path, ["--forward-on-disconnect", "--forward-to", "127.0.0.1:%d" % server.port,
                                      "--retry-interval", "1", "--retry-lifetime", "3"], name="a") as a:
            submit(a.port)
            helpers.wait_for(lambda: a.files(".bad"), timeout=20, what="the message to fail")
            log = a.log()
            assert re.search(r"temporary failure 1: .*: next attempt in 1s", log)
            assert re.search(r"temporary failure 2: .*: next attempt in 2s", log)
            [bad] = a.files(".bad")
            with open(os.path.join(a.spool, bad), "rb") as f:
                text = f.read()
            assert re.search(rb"X-MailRelay-Reason: .*452 4\.3\.1 insufficient system storage"
                             rb" \(gave up after 3 attempts in \d+s\)", text)
            assert b"X-MailRelay-ReasonCode: 452" in text
            # The retry state is gone, so emailrelay-resubmit starts it afresh.
            assert b"X-MailRelay-Retry:" not in text
            assert "failing envelope [%s.envelope.busy] -> [%s]" % (bad[:-len(".envelope.bad")], bad) in log
    finally:
        server.close()


def test_retry_state_survives_a_restart_and_flush_ignores_it(tmp_path):
    server = ScriptedServer(reject={"b@y.test": BUSY})
    try:
        a = helpers.Relay(tmp_path, ["--forward", "--forward-on-disconnect",
                                     "--forward-to", "127.0.0.1:%d" % server.port,
                                     "--retry-interval", "600"], name="a", admin=True)
        with a:
            submit(a.port)
            a.wait_log(r"temporary failure 1: ")
        sessions = len(server.sessions)
        with a.start():
            admin = Admin(a.admin_port)
            try:
                # flush runs after the start-up pass (--forward), and tries the
                # message although its time has not come.
                answer = admin.cmd("flush").strip()
                assert answer == "error: 0 message(s) sent, 0 failed, 1 to be retried"
            finally:
                admin.close()
            # The count went on from the first run; the start-up pass left the
            # message alone (one new session: flush's).
            assert only_envelope(a).retry().count == 2
            assert len(server.sessions) == sessions + 1
    finally:
        server.close()


def test_proxy_with_the_next_hop_down_sends_when_it_comes_up(tmp_path):
    port = helpers.free_port()
    with helpers.Relay(tmp_path, ["--as-proxy", "127.0.0.1:%d" % port, "--retry-interval", "1"],
                       name="a") as a:
        submit(a.port, subject="proxied")
        a.wait_log(r"temporary failure 1: cannot connect to 127\.0\.0\.1:%d" % port)
        server = ScriptedServer(port=port)
        try:
            helpers.wait_for(lambda: delivered(server), timeout=15, what="the proxied message")
            assert b"Subject: proxied" in delivered(server)[0]
            helpers.wait_for(lambda: not a.files(".envelope"), what="the spool to empty")
        finally:
            server.close()


def test_retry_interval_0_fails_a_4xx_at_once_as_emailrelay(tmp_path):
    server = ScriptedServer(reject={"b@y.test": BUSY})
    try:
        spool = tmp_path / "spool"
        spool.mkdir()
        put_message(spool, b"Subject: x\r\n\r\n")
        r = helpers.run_emailrelay(["--as-client", "127.0.0.1:%d" % server.port, "--spool-dir", str(spool),
                                    "--retry-interval", "0"])
        assert r.returncode == 1
        assert len(helpers.spool_files(str(spool), ".bad")) == 1
    finally:
        server.close()


def test_as_client_is_one_pass_that_keeps_temporary_failures_queued(tmp_path):
    server = ScriptedServer(reject={"b@y.test": BUSY})
    try:
        spool = tmp_path / "spool"
        spool.mkdir()
        put_message(spool, b"Subject: x\r\n\r\n")
        args = ["--as-client", "127.0.0.1:%d" % server.port, "--spool-dir", str(spool)]
        for attempt in (1, 2):
            r = helpers.run_emailrelay(args)
            assert r.returncode == 1 and "temporary failure %d" % attempt in r.stderr
            [name] = helpers.spool_files(str(spool), ".envelope")
            assert Envelope.read(os.path.join(str(spool), name)).retry().count == attempt
        server.reject.clear()
        assert helpers.run_emailrelay(args).returncode == 0
        assert helpers.spool_files(str(spool), ".envelope") == []
    finally:
        server.close()


def test_a_back_off_stored_earlier_is_capped_by_a_smaller_retry_max_interval(tmp_path):
    """A message deferred for ten minutes by an earlier run goes within seconds once
    the relay is restarted with --retry-max-interval 2."""
    server = ScriptedServer(reject={"b@y.test": BUSY})
    try:
        args = ["--forward", "--forward-on-disconnect", "--forward-to", "127.0.0.1:%d" % server.port,
                "--retry-interval", "600"]
        a = helpers.Relay(tmp_path, args, name="a")
        with a:
            submit(a.port, subject="capped")
            a.wait_log(r"temporary failure 1: .*: next attempt in 600s")
        server.reject.clear()
        a.args[a.args.index("600")] = "1"
        a.args += ["--retry-max-interval", "2"]
        with a.start():
            helpers.wait_for(lambda: delivered(server), timeout=30, what="the deferred message")
            assert b"Subject: capped" in delivered(server)[0]
            helpers.wait_for(lambda: not a.files(".envelope"), what="the spool to empty")
    finally:
        server.close()
