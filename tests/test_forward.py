"""Forwarding end to end: the real program forwarding to real next hops.

Next hops: Postfix's smtp-sink (dumping what arrived), and the relay itself
(`python3 -m emailrelay`) as relay B, storing what arrives in its spool and
refusing some recipients through an --address-verifier or whole messages
through a --filter, so every outcome and its `.bad` reason can be checked.
"""

import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time

import pytest

import helpers
from test_client import ScriptedServer, dumping_sink, put_message, sink_dumps

VERIFIER = """#!/bin/sh
case "$1" in
  bad*) echo "no such user: $1"; exit 2 ;;
  busy*) echo "mailbox busy: $1"; exit 3 ;;
esac
echo ""
echo "$1"
exit 1
"""


def write_script(tmp_path, name, text):
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def submit(port, to=("b@y.test",), subject="hello", body="body\r\n"):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("a@x.test", list(to), "Subject: %s\r\n\r\n%s" % (subject, body))


def envelopes(directory, suffix=".envelope"):
    return helpers.spool_files(directory, suffix)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def relay_b(tmp_path, *args):
    """A storing relay: the next hop whose spool shows what arrived."""
    return helpers.Relay(tmp_path, list(args), name="b")


def as_client(port, spool, *args, timeout=60):
    return helpers.run_emailrelay(["--as-client", "127.0.0.1:%d" % port, "--spool-dir", str(spool)]
                                  + list(args), timeout=timeout)


# -- --as-client ---------------------------------------------------------------

def test_as_client_forwards_everything_and_exits_0(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()
    for i in range(5):
        put_message(spool, b"Subject: m%d\r\n\r\nbody\r\n" % i)
    port = helpers.free_port()
    sink = dumping_sink(port, sink_dir)
    try:
        done = as_client(port, spool)
        assert done.returncode == 0, done.stderr
        assert os.listdir(str(spool)) == []
        helpers.wait_for(lambda: len(os.listdir(str(sink_dir))) == 5, what="5 messages at the sink")
        subjects = sorted(re.search(rb"Subject: (m\d)", d).group(1) for d in sink_dumps(sink_dir))
        assert subjects == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    finally:
        helpers.stop_process(sink)


def test_as_client_with_unreachable_next_hop_keeps_messages_and_fails(tmp_path):
    for i in range(2):
        put_message(tmp_path, b"x\r\n")
    port = helpers.free_port()
    done = as_client(port, tmp_path)
    assert done.returncode != 0
    assert "cannot connect to 127.0.0.1:%d" % port in done.stderr
    assert len(envelopes(tmp_path)) == 2
    assert envelopes(tmp_path, ".bad") == [] and envelopes(tmp_path, ".busy") == []


def test_bare_cr_lf_content_arrives_as_crlf_at_relay_b(tmp_path):
    with relay_b(tmp_path) as b:
        spool = tmp_path / "spool"
        spool.mkdir()
        put_message(spool, b"Subject: eol\n\nbare lf\nbare cr\rcrlf\r\n.dot\n")
        assert as_client(b.port, spool).returncode == 0
        content = helpers.wait_for(lambda: b.files(".content"), what="content at relay B")
        data = read(os.path.join(b.spool, content[0]))
        body = data[data.index(b"Subject: eol"):]
        assert body == b"Subject: eol\r\n\r\nbare lf\r\nbare cr\r\ncrlf\r\n.dot\r\n"


def test_refusals_become_bad_with_reasons(tmp_path):
    verifier = write_script(tmp_path, "verifier", VERIFIER)
    with relay_b(tmp_path, "--address-verifier", verifier) as b:
        spool = tmp_path / "spool"
        spool.mkdir()
        good = put_message(spool, b"Subject: good\r\n\r\n", to=["ok@y.test"])
        bad = put_message(spool, b"Subject: bad\r\n\r\n", to=["ok@y.test", "bad@y.test"])
        busy = put_message(spool, b"Subject: busy\r\n\r\n", to=["busy@y.test"])
        done = as_client(b.port, spool)
        assert done.returncode != 0
        assert helpers.spool_files(str(spool), ".bad") == [bad + ".envelope.bad"]
        bad_text = read(os.path.join(str(spool), bad + ".envelope.bad"))
        assert re.search(rb"X-MailRelay-Reason: one or more recipients rejected: "
                         rb"<bad@y.test> 550 .*no such user", bad_text)
        assert b"X-MailRelay-ReasonCode: 550" in bad_text
        # A 4xx is temporary: the message stays queued with its retry state.
        busy_text = read(os.path.join(str(spool), busy + ".envelope"))
        assert re.search(rb"X-MailRelay-Retry: 1 \d+ \d+ one or more recipients rejected: "
                         rb"<busy@y.test> 450 .*mailbox busy", busy_text)
        assert not os.path.exists(os.path.join(str(spool), good + ".envelope"))
        assert len(b.files(".envelope")) == 1


def test_filter_refusal_at_the_next_hop(tmp_path):
    with relay_b(tmp_path, "--filter", "exit:1") as b:
        spool = tmp_path / "spool"
        spool.mkdir()
        mid = put_message(spool, b"Subject: f\r\n\r\n")
        # E-MailRelay's reply to a filter's exit 1-99 is 452; without retries
        # (E-MailRelay's policy) the message fails at once.
        r = as_client(b.port, spool, "--retry-interval", "0")
        assert r.returncode == 1
        # The summary is info, as E-MailRelay 2.6 logs nothing above info.
        assert "info: forwarding: not every message was forwarded: exit status 1" in r.stderr
        assert "error:" not in r.stderr
        text = read(os.path.join(str(spool), mid + ".envelope.bad"))
        assert text.endswith(b"X-MailRelay-Reason: 452 rejected\r\nX-MailRelay-ReasonCode: 452\r\n")


def test_forward_to_some_keeps_only_the_refused_recipients(tmp_path):
    verifier = write_script(tmp_path, "verifier", VERIFIER)
    with relay_b(tmp_path, "--address-verifier", verifier) as b:
        spool = tmp_path / "spool"
        spool.mkdir()
        mid = put_message(spool, b"Subject: some\r\n\r\n", to=["ok@y.test", "bad@y.test"])
        assert as_client(b.port, spool, "--forward-to-some").returncode != 0
        arrived = read(os.path.join(b.spool, helpers.wait_for(lambda: b.files(".envelope"))[0]))
        assert b"X-MailRelay-To-Remote: ok@y.test" in arrived and b"bad@y.test" not in arrived
        left = read(os.path.join(str(spool), mid + ".envelope.bad"))
        assert b"X-MailRelay-To-Remote: bad@y.test" in left and b"ok@y.test" not in left
        assert b"X-MailRelay-ReasonCode: 550" in left


# -- triggers -----------------------------------------------------------------------

def test_relay_chain_with_forward_on_disconnect(tmp_path):
    with relay_b(tmp_path) as b, \
            helpers.Relay(tmp_path, ["--forward-on-disconnect", "--forward-to", "127.0.0.1:%d" % b.port],
                          name="a") as a:
        submit(a.port, subject="chain")
        helpers.wait_for(lambda: b.files(".envelope"), what="message at relay B")
        helpers.wait_for(lambda: not a.files(".envelope") and not a.files(".busy"),
                         what="relay A spool empty")
        assert b"Subject: chain" in read(os.path.join(b.spool, b.files(".content")[0]))


def test_poll_with_client_filter_102_forwards_one_per_poll(tmp_path):
    with relay_b(tmp_path) as b:
        with helpers.Relay(tmp_path, ["--poll", "1", "--client-filter", "exit:102",
                                      "--forward-to", "127.0.0.1:%d" % b.port], name="a",
                           start=False) as a:
            for i in range(3):
                put_message(a.spool, b"Subject: p%d\r\n\r\n" % i)
            a.start()
            helpers.wait_for(lambda: len(b.files(".envelope")) == 3, timeout=15, what="three polls")
            # Each pass logs what it sent: one message per poll, never more.
            helpers.wait_for(lambda: len(re.findall(r"forwarding: \d+ message\(s\) sent", a.log())) >= 3,
                             what="three pass log lines")
            sent = re.findall(r"forwarding: (\d+) message\(s\) sent", a.log())
            assert sent[:3] == ["1", "1", "1"]


def test_client_filter_105_sends_the_message_then_stops_the_pass(tmp_path):
    """Seed 000: 105 stops scanning "after processing the current one"."""
    with relay_b(tmp_path) as b:
        spool = tmp_path / "spool"
        spool.mkdir()
        first = put_message(spool, b"Subject: first\r\n\r\n")
        put_message(spool, b"Subject: second\r\n\r\n")
        as_client(b.port, spool, "--client-filter", "exit:105")
        helpers.wait_for(lambda: b.files(".envelope"), what="the message at relay B")
        assert b"Subject: first" in read(os.path.join(b.spool, b.files(".content")[0]))
        left = helpers.spool_files(str(spool), ".envelope")
        assert len(left) == 1 and not left[0].startswith(first)
        assert helpers.spool_files(str(spool), ".bad") == []


def test_forward_at_startup(tmp_path):
    with relay_b(tmp_path) as b:
        a = helpers.Relay(tmp_path, ["--forward", "--forward-to", "127.0.0.1:%d" % b.port], name="a",
                          start=False)
        put_message(a.spool, b"Subject: s\r\n\r\n")
        with a.start():
            helpers.wait_for(lambda: b.files(".envelope"), what="message at relay B")


def test_immediate_passes_the_refusal_back(tmp_path):
    verifier = write_script(tmp_path, "verifier", VERIFIER)
    with relay_b(tmp_path, "--address-verifier", verifier) as b, \
            helpers.Relay(tmp_path, ["--immediate", "--forward-to", "127.0.0.1:%d" % b.port], name="a") as a:
        submit(a.port, to=["ok@y.test"])
        assert len(b.files(".envelope")) == 1
        with pytest.raises(smtplib.SMTPDataError) as e:
            submit(a.port, to=["bad@y.test"])
        assert e.value.smtp_code == 550 and b"no such user" in e.value.smtp_error
        # The refused message is .bad with the reason (as E-MailRelay 2.6).
        assert a.files(".envelope") == []
        [bad] = a.files(".bad")
        assert b"X-MailRelay-Reason: one or more recipients rejected: <bad@y.test> 550" \
            in read(os.path.join(a.spool, bad))


def test_immediate_passes_a_temporary_refusal_back_word_for_word(tmp_path):
    """A 4xx from the next hop reaches the submitter as it is (not 250), and
    the message is not also kept for a retry of ours (it is .bad, as in 2.6)."""
    server = ScriptedServer(data_reply=b"451 queue full, try again later")
    try:
        with helpers.Relay(tmp_path, ["--immediate", "--forward-to", "127.0.0.1:%d" % server.port],
                           name="a") as a:
            with pytest.raises(smtplib.SMTPDataError) as e:
                submit(a.port)
            assert (e.value.smtp_code, e.value.smtp_error) == (451, b"queue full, try again later")
            assert a.files(".envelope") == []
            [bad] = a.files(".bad")
            text = read(os.path.join(a.spool, bad))
            assert b"X-MailRelay-Reason: 451 queue full, try again later\r\n" in text
            assert b"X-MailRelay-ReasonCode: 451\r\n" in text
    finally:
        server.close()


def test_immediate_client_filter_rejection_is_452_with_its_response(tmp_path):
    client_filter = write_script(tmp_path, "client-filter", "#!/bin/sh\necho '<<not today>>'\nexit 1\n")
    with relay_b(tmp_path) as b, \
            helpers.Relay(tmp_path, ["--immediate", "--client-filter", client_filter,
                                     "--forward-to", "127.0.0.1:%d" % b.port], name="a") as a:
        with pytest.raises(smtplib.SMTPDataError) as e:
            submit(a.port)
        assert (e.value.smtp_code, e.value.smtp_error) == (452, b"not today")
        assert b.files(".envelope") == [] and len(a.files(".bad")) == 1


def test_immediate_keeps_one_connection_for_the_submitting_session(tmp_path):
    with relay_b(tmp_path) as b, \
            helpers.Relay(tmp_path, ["--immediate", "--forward-to", "127.0.0.1:%d" % b.port], name="a") as a:
        with smtplib.SMTP("127.0.0.1", a.port, timeout=10) as s:
            for i in range(3):
                s.sendmail("a@x.test", ["b@y.test"], "Subject: %d\r\n\r\nbody\r\n" % i)
                # Each 250 came after the next hop took the message.
                assert len(b.files(".envelope")) == i + 1
        assert a.files(".envelope") == []
        assert b.log().count("smtp connection from") == 1


def test_immediate_submitters_are_answered_side_by_side_when_the_next_hop_is_silent(tmp_path):
    # A next hop that takes connections and never greets: each submitter
    # waits the response timeout once, not once per submitter ahead of it.
    timeout = 4
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        args = ["--immediate", "--forward-to", "127.0.0.1:%d" % silent.getsockname()[1],
                "--response-timeout", str(timeout), "--retry-interval", "1"]
        with helpers.Relay(tmp_path, args) as relay:
            took = []

            def submitter(n):
                start = time.monotonic()
                with smtplib.SMTP("127.0.0.1", relay.port, timeout=120) as s:
                    s.sendmail("a@x.test", ["b@y.test"], "Subject: %d\r\n\r\nbody\r\n" % n)
                took.append(time.monotonic() - start)
            threads = [threading.Thread(target=submitter, args=(n,)) for n in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            # Every message was kept (250) for a retry, and the forwarding
            # thread comes back for them at their retry time (it may hold
            # some already).
            assert len(took) == 5
            assert len(relay.files(".envelope") + relay.files(".envelope.busy")) == 5
            relay.wait_log(r"temporary failure 2:", timeout=3 * timeout)
    assert min(took) >= timeout * 0.9
    assert max(took) < 2 * timeout, "the last submitter waited %.1fs" % max(took)


def test_etrn_starts_forwarding(tmp_path):
    with relay_b(tmp_path) as b, \
            helpers.Relay(tmp_path, ["--forward-to", "127.0.0.1:%d" % b.port], name="a") as a:
        submit(a.port)
        assert a.files(".envelope") and not b.files(".envelope")
        with smtplib.SMTP("127.0.0.1", a.port, timeout=10) as s:
            s.ehlo("x")
            assert s.has_extn("etrn")
            code, _ = s.docmd("ETRN", "y.test")
            assert code in (250, 251, 252, 253)
        helpers.wait_for(lambda: b.files(".envelope"), what="message at relay B")


def test_client_auth_to_a_relay_requiring_auth(tmp_path):
    server_secrets = write_script(tmp_path, "server.auth", "server plain carol secret\n")
    client_secrets = write_script(tmp_path, "client.auth", "client plain carol secret\n")
    wrong_secrets = write_script(tmp_path, "wrong.auth", "client plain carol wrong\n")
    with relay_b(tmp_path, "--server-auth", server_secrets) as b:
        spool = tmp_path / "spool"
        spool.mkdir()
        put_message(spool, b"Subject: auth\r\n\r\n")
        done = as_client(b.port, spool, "--client-auth", wrong_secrets)
        assert done.returncode != 0 and "authentication failed" in done.stderr
        # Refused AUTH fails the message (as E-MailRelay 2.6); resubmitted, it goes.
        [bad] = envelopes(spool, ".bad")
        assert b"X-MailRelay-Reason: authentication failed: " in read(os.path.join(str(spool), bad))
        assert subprocess.run([helpers.PYTHON, os.path.join(helpers.BIN, "emailrelay-resubmit"),
                               str(spool)], env=helpers.env()).returncode == 0
        assert len(envelopes(spool)) == 1
        assert as_client(b.port, spool, "--client-auth", client_secrets).returncode == 0
        arrived = read(os.path.join(b.spool, helpers.wait_for(lambda: b.files(".envelope"))[0]))
        assert b"X-MailRelay-Authentication: carol" in arrived
        assert b"X-MailRelay-MailFromAuthIn: carol" in arrived


# -- sharing, crashes ------------------------------------------------------------------

def test_two_forwarders_sharing_a_spool_deliver_each_message_once(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()
    for i in range(500):
        put_message(spool, b"Subject: n%d\r\n\r\nbody\r\n" % i)
    port = helpers.free_port()
    sink = dumping_sink(port, sink_dir, count=200)
    try:
        procs = [subprocess.Popen([helpers.PYTHON, "-m", "emailrelay", "--as-client", "127.0.0.1:%d" % port,
                                   "--spool-dir", str(spool), "--verbose"], cwd=helpers.ROOT, env=helpers.env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
        outputs = [p.communicate(timeout=120)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert all(re.search(r"\d+ message\(s\) sent", o) for o in outputs), outputs
        assert os.listdir(str(spool)) == []
        helpers.wait_for(lambda: len(os.listdir(str(sink_dir))) >= 500, what="500 messages")
        subjects = [re.search(rb"Subject: (n\d+)", d).group(1) for d in sink_dumps(sink_dir)]
        assert len(subjects) == 500 and len(set(subjects)) == 500
    finally:
        helpers.stop_process(sink)


def test_killed_forwarder_loses_nothing(tmp_path):
    slow = write_script(tmp_path, "slow", "#!/bin/sh\nsleep 0.1\nexit 0\n")
    with relay_b(tmp_path, "--filter", slow) as b:
        spool = tmp_path / "spool"
        spool.mkdir()
        for i in range(20):
            put_message(spool, b"Subject: k%d\r\n\r\n" % i)
        proc = subprocess.Popen([helpers.PYTHON, "-m", "emailrelay", "--as-client", "127.0.0.1:%d" % b.port,
                                 "--spool-dir", str(spool)], cwd=helpers.ROOT, env=helpers.env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        helpers.wait_for(lambda: len(b.files(".envelope")) >= 3, what="some messages forwarded")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(envelopes(spool)) + len(envelopes(spool, ".busy")) > 0
        assert as_client(b.port, spool).returncode == 0
        # No envelope is left in any state. (A kill between the two unlinks
        # of a sent message can leave its content file, which nothing refers to.)
        assert [n for n in os.listdir(str(spool)) if ".envelope" in n] == []
        contents = [read(os.path.join(b.spool, n)) for n in b.files(".content")]
        subjects = {re.search(rb"Subject: (k\d+)", c).group(1) for c in contents}
        assert subjects == {b"k%d" % i for i in range(20)}


def test_concurrent_triggers_are_not_lost(tmp_path):
    with relay_b(tmp_path) as b, \
            helpers.Relay(tmp_path, ["--forward-on-disconnect", "--forward-to", "127.0.0.1:%d" % b.port],
                          name="a") as a:
        threads = [threading.Thread(target=submit, args=(a.port,), kwargs={"subject": "t%d" % i})
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        helpers.wait_for(lambda: len(b.files(".envelope")) == 8, what="8 messages at relay B")
        helpers.wait_for(lambda: not a.files(".envelope") and not a.files(".busy"),
                         what="relay A spool empty")
        assert len(b.files(".envelope")) == 8


def test_each_stored_and_each_forwarded_message_has_one_log_line(tmp_path):
    """What a sysadmin greps: the stored line (id, sender, recipient count, size,
    client) and the sent line (id, recipients, next hop and its reply)."""
    from test_client import ScriptedServer
    server = ScriptedServer(data_reply=b"250 2.0.0 Ok: queued as DED0B1680CA",
                            reject={"gone@y.test": b"550 5.1.1 no such user"})
    try:
        next_hop = "127.0.0.1:%d" % server.port
        with helpers.Relay(tmp_path, ["--forward-on-disconnect", "--forward-to", next_hop,
                                      "--forward-to-some"]) as relay:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
                c.sendmail("a@x.test", ["b@y.test", "gone@y.test", "c@y.test"],
                           b"Subject: traced\r\n\r\nhello\r\n")
                client = "127.0.0.1:%d" % c.sock.getsockname()[1]
            sent = relay.wait_log(r"info: forwarding: (emailrelay\.\S+): (.*)\n")
            stored = re.search(r"info: smtp: stored (emailrelay\.\S+): (.*)\n", relay.log())
    finally:
        server.close()
    assert stored.group(1) == sent.group(1)
    size = re.fullmatch(r"from=<a@x\.test> nrcpt=3 size=(\d+) client=" + re.escape(client),
                        stored.group(2))
    assert size and int(size.group(1)) > len("Subject: traced\r\n\r\nhello\r\n")
    assert sent.group(2) == ("to=<b@y.test>,<c@y.test> relay=%s status=sent "
                             "(250 2.0.0 Ok: queued as DED0B1680CA)" % next_hop)
