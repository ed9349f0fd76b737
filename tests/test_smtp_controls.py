"""ZMailer smtpserver's policy controls, through the real program and real clients.

--max-load below the current load, --tarpit delays measured (and another
session not delayed), --helo-check seen from swaks and smtplib, --greeting
macros, --help-text, --server-auth-program (accept, reject, a hang cut
off by the timeout, the password in no ps output), the TLS protocol and
cipher in the Received line, and the per-address connection limit (450,
then silence under a flood).
"""

import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time

from helpers import Relay, spool_files, stop_process, wait_for


def write(path, text, mode=0o644):
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def read_reply(f):
    lines = []
    while True:
        line = f.readline()
        if not line:
            return b"".join(lines)
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


def contents(spool):
    result = []
    for name in spool_files(spool, ".envelope"):
        with open(os.path.join(spool, name[:-len(".envelope")] + ".content"), "rb") as f:
            result.append(f.read())
    return result


# -- --max-load ---------------------------------------------------------------------------

def test_max_load_below_the_current_load_refuses_with_421(tmp_path):
    burner = None
    if os.getloadavg()[0] <= 0:
        # An idle machine: make some load so that a threshold of 0 is below it.
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        wait_for(lambda: os.getloadavg()[0] > 0, timeout=60, what="a load average above 0")
        with Relay(tmp_path, ["--max-load", "0"]) as relay:
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
                    f = s.makefile("rb")
                    assert f.readline() == b"421 relay.test system overloaded, try again later\r\n"
                    assert f.readline() == b""
            log = relay.log()
        assert log.count("is above --max-load 0: refusing connections") == 1
        with Relay(tmp_path, ["--max-load", "1000"], name="high") as relay:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
                assert c.noop()[0] == 250
    finally:
        if burner is not None:
            stop_process(burner)


def test_max_load_must_be_a_number(tmp_path):
    from helpers import run_emailrelay
    ran = run_emailrelay(["--max-load", "high", "--spool-dir", str(tmp_path)])
    assert ran.returncode == 2 and "--max-load: invalid load average high" in ran.stderr


# -- --tarpit -----------------------------------------------------------------------------

def test_tarpit_delays_grow_and_cap_and_other_sessions_are_not_delayed(tmp_path):
    with Relay(tmp_path, ["--tarpit", "0.4,1,1"]) as relay:
        a = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
        a.ehlo("client.test")
        delays = []
        for _ in range(4):
            start = time.monotonic()
            assert a.docmd("BOGUS")[0] == 500
            delays.append(time.monotonic() - start)
        # 0.4, then 0.4 + 0.4*1 = 0.8, then 1.6 capped at 1.
        assert 0.4 <= delays[0] < delays[1] - 0.2
        assert 0.8 <= delays[1]
        # Uncapped, the fourth would wait 3.2 s.
        assert 1.0 <= delays[2] and 1.0 <= delays[3] < 2.8

        # While session a waits before its next error reply, session b is served at once.
        result = {}
        t = threading.Thread(target=lambda: result.update(reply=a.docmd("BOGUS")))
        t.start()
        b = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
        assert b.ehlo("other.test")[0] == 250
        assert b.noop()[0] == 250
        assert t.is_alive()        # a is still waiting for its reply
        b.quit()
        t.join(10)
        assert result["reply"][0] == 500
        a.quit()
        assert "tarpit: waiting 1s before an error reply" in relay.log()


def test_tarpit_syntax_is_checked(tmp_path):
    from helpers import run_emailrelay
    for bad in ("1,2", "a,b,c", "1,-2,3", "1,2,3,4"):
        ran = run_emailrelay(["--tarpit", bad, "--spool-dir", str(tmp_path)])
        assert ran.returncode == 2 and "--tarpit: expected" in ran.stderr, bad


# -- --helo-check -------------------------------------------------------------------------

def swaks(port, ehlo):
    ran = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % port, "--ehlo", ehlo,
                          "--from", "a@x.test", "--to", "b@y.test", "--quit-after", "EHLO"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=60)
    return ran.stdout


def test_helo_check_refuses_bad_names_and_accepts_domains_and_literals(tmp_path):
    with Relay(tmp_path, ["--helo-check"]) as relay:
        out = swaks(relay.port, "bad_name!")
        assert "<** 501 invalid domain name or address literal: bad_name!" in out
        assert "<-  250-relay.test says hello" in swaks(relay.port, "client.example.com")
        for good in ("[127.0.0.1]", "[IPv6:::1]", "localhost", "xn--bcher-kva.example"):
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
                assert c.ehlo(good)[0] == 250, good
        for bad in ("host..example", "-host.example", "1.2.3.4", "[1.2.3]", "host.example."):
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
                assert c.ehlo(bad)[0] == 501, bad
                assert c.helo(bad)[0] == 501, bad
                assert c.helo("client.example.com")[0] == 250
    with Relay(tmp_path, [], name="unchecked") as relay:
        assert "<-  250-relay.test says hello" in swaks(relay.port, "bad_name!")


# -- --greeting and --help-text -----------------------------------------------------------

def test_greeting_macros(tmp_path):
    from emailrelay import __version__
    with Relay(tmp_path, ["--greeting", "%H ESMTP %V ready at %T (100%% local)",
                          "--greeting", "%H no UCE"]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            greeting = read_reply(s.makefile("rb")).decode()
    m = re.match(r"220-relay\.test ESMTP (\S+) ready at (.+) \(100% local\)\r\n"
                 r"220 relay\.test no UCE\r\n\Z", greeting)
    assert m, greeting
    assert m.group(1) == __version__
    assert re.match(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\Z", m.group(2))


def test_greeting_ident_and_language_macros_expand_to_nothing(tmp_path):
    # Seed 004's %I (+IDENT after an ident look-up) and %X (the translation
    # table): this server does neither.
    with Relay(tmp_path, ["--greeting", "%H ESMTP%I ready%X"]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            assert read_reply(s.makefile("rb")) == b"220 relay.test ESMTP ready\r\n"


def test_greeting_with_an_unknown_macro_is_a_usage_error(tmp_path):
    from helpers import run_emailrelay
    ran = run_emailrelay(["--greeting", "%H at %Q", "--spool-dir", str(tmp_path)])
    assert ran.returncode == 2
    assert "--greeting: unknown macro %Q (expected %H, %V, %T, %I, %X or %%)" in ran.stderr


def test_help_text_lines_follow_the_command_list(tmp_path):
    text = write(tmp_path / "help.txt", "This server is at Yoyodyne Propulsion Inc.\n\n"
                 "Abuse reports to <abuse@example.com>\n")
    with Relay(tmp_path, ["--help-text", text]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            c.putcmd("HELP")
            code, reply = c.getreply()
            assert c.docmd("HELP", "MAIL")[0] == 214
    assert code == 214
    lines = reply.decode().split("\n")
    assert lines[0].startswith("commands: ") and "MAIL" in lines[0]
    assert lines[1:] == ["This server is at Yoyodyne Propulsion Inc.", "",
                         "Abuse reports to <abuse@example.com>"]


def test_expn_is_refused_with_502_and_the_help_text(tmp_path):
    text = write(tmp_path / "help.txt", "Postmaster: <postmaster@example.com>\n"
                 "Telephone +1-234-567-8900\n")
    with Relay(tmp_path, ["--help-text", text]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.docmd("EXPN", "staff") == (
                502, b"command not implemented\nPostmaster: <postmaster@example.com>\n"
                     b"Telephone +1-234-567-8900")
    with Relay(tmp_path, [], name="plain") as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            assert c.docmd("EXPN", "staff") == (502, b"command not implemented")


def test_help_text_file_must_be_readable(tmp_path):
    from helpers import run_emailrelay
    (tmp_path / "spool").mkdir()
    ran = run_emailrelay(["--help-text", str(tmp_path / "missing"), "--no-daemon",
                          "--spool-dir", str(tmp_path / "spool"), "--port", "1"])
    assert ran.returncode == 1 and "--help-text: cannot read" in ran.stderr


# -- --server-auth-program ----------------------------------------------------------------

PASSWORD = "s3cret pw+/="


def tls_client(port):
    c = smtplib.SMTP("127.0.0.1", port, timeout=30)
    c.ehlo("client.test")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    c.starttls(context=context)
    c.ehlo("client.test")
    return c


def test_server_auth_program_accepts_rejects_and_times_out(tmp_path, certs):
    pids = tmp_path / "pids"
    checker = write(tmp_path / "checker",
                    '#!/bin/sh\necho "$1 $$" >> %s\n'
                    'if [ "$1" = hang ]; then exec sleep 60; fi\n'
                    'read -r pw\n[ "$1" = alice ] && [ "$pw" = "%s" ]\n' % (pids, PASSWORD),
                    0o755)
    args = ["--server-auth-program", checker, "--filter-timeout", "1.5", "--server-tls",
            "--server-tls-certificate", certs.server]
    with Relay(tmp_path, args) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
            c.ehlo("client.test")
            assert not c.has_extn("auth")         # never a password in clear
            assert c.docmd("MAIL FROM:<a@x.test>")[0] == 530
        c = tls_client(relay.port)
        assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert c.login("alice", PASSWORD)[0] == 235
        c.sendmail("a@x.test", ["b@y.test"], b"Subject: auth\r\n\r\nhi\r\n")
        c.quit()
        for user, password in (("alice", "wrong"), ("bob", PASSWORD)):
            c = tls_client(relay.port)
            try:
                c.login(user, password)
                raise AssertionError("login accepted")
            except smtplib.SMTPAuthenticationError as e:
                assert e.smtp_code == 535
            c.close()

        # A checker that hangs: the login fails after the timeout, the program is killed,
        # and the password is in no process's arguments meanwhile.
        c = tls_client(relay.port)
        result = {}

        def login():
            start = time.monotonic()
            try:
                c.login("hang", PASSWORD)
            except smtplib.SMTPAuthenticationError as e:
                result["code"] = e.smtp_code
            result["took"] = time.monotonic() - start
        t = threading.Thread(target=login)
        t.start()
        wait_for(lambda: "hang " in pids.read_text(), what="the hanging checker")
        hung = int(pids.read_text().split("hang ")[1].split()[0])

        def cmdline():
            with open("/proc/%d/cmdline" % hung, "rb") as f:
                return f.read() == b"sleep\x0060\x00"
        wait_for(cmdline, what="the checker to hang")
        ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], stdout=subprocess.PIPE,
                            universal_newlines=True).stdout
        assert re.search(r"^\s*%d sleep 60$" % hung, ps, re.M), ps
        assert PASSWORD not in ps and "s3cret" not in ps
        with open("/proc/%d/environ" % hung, "rb") as f:
            assert b"s3cret" not in f.read()
        t.join(30)
        c.close()
        assert result["code"] == 535 and 1.5 <= result["took"] < 10
        wait_for(lambda: not os.path.exists("/proc/%d" % hung), what="the checker killed")
        log = relay.log()
    assert "no answer after 1.5s: refusing user hang" in log
    assert "s3cret" not in log
    [content] = contents(relay.spool)
    assert b"with ESMTPSA id" in content


def test_server_auth_program_without_tls_warns_or_offers_auth_when_the_site_says_so(tmp_path):
    checker = write(tmp_path / "checker",
                    '#!/bin/sh\nread -r pw\n[ "$1" = alice ] && [ "$pw" = "%s" ]\n' % PASSWORD,
                    0o755)
    with Relay(tmp_path, ["--server-auth-program", checker], name="silent") as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
            c.ehlo("client.test")
            assert not c.has_extn("auth")
        log = relay.log()
    assert ("warning: --server-auth-program: AUTH PLAIN and LOGIN are offered only over "
            "TLS and there is no --server-tls: clients cannot authenticate") in log
    # Seed 004's PARAM AUTH-LOGIN-also-without-TLS, spelt as ZMailer spells it.
    with Relay(tmp_path, ["--server-auth-program", checker,
                          "-Z", "AUTH-LOGIN-also-without-TLS"], name="opted-in") as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
            c.ehlo("client.test")
            assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            assert c.login("alice", PASSWORD)[0] == 235
            c.sendmail("a@x.test", ["b@y.test"], b"Subject: auth\r\n\r\nhi\r\n")
        log = relay.log()
    assert "are offered only over TLS" not in log
    [content] = contents(relay.spool)
    assert b"with ESMTPA id" in content


def test_server_auth_program_with_server_auth_is_a_usage_error(tmp_path):
    from helpers import run_emailrelay
    ran = run_emailrelay(["--server-auth-program", "/bin/true", "--server-auth", "/etc/x",
                          "--spool-dir", str(tmp_path)])
    assert ran.returncode == 2 and "cannot be used together" in ran.stderr


# -- Received: with TLS -------------------------------------------------------------------

def test_received_line_names_tls_protocol_and_cipher(tmp_path, certs):
    args = ["--server-tls", "--server-tls-certificate", certs.server]
    with Relay(tmp_path, args) as relay:
        c = tls_client(relay.port)
        cipher = c.sock.cipher()
        c.sendmail("a@x.test", ["b@y.test"], b"Subject: tls\r\n\r\nhi\r\n")
        c.quit()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.sendmail("a@x.test", ["b@y.test"], b"Subject: plain\r\n\r\nhi\r\n")
        tls_content, plain_content = contents(relay.spool)
    first = tls_content.split(b"\r\n")[0].decode()
    assert first.startswith("Received: from client.test ([127.0.0.1]) (using %s with cipher %s "
                            "(%d/%d bits)) by relay.test with ESMTPS id "
                            % (cipher[1], cipher[0], cipher[2], cipher[2])), first
    assert b"(using" not in plain_content.split(b"\r\n")[0]
    with Relay(tmp_path, args + ["--anonymous=content"], name="anonymous") as relay:
        c = tls_client(relay.port)
        c.sendmail("a@x.test", ["b@y.test"], b"Subject: tls\r\n\r\nhi\r\n")
        c.quit()
        [content] = contents(relay.spool)
    assert content.startswith(b"Subject: tls")


# -- per-address connection limit ---------------------------------------------------------

def test_per_address_limit_450_then_silence_under_a_flood(tmp_path):
    with Relay(tmp_path, ["--max-connections-per-address", "2"]) as relay:
        held = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            assert s.makefile("rb").readline().startswith(b"220 ")
            held.append(s)
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            f = s.makefile("rb")
            assert f.readline() == b"450 too many connections from your address\r\n"
            assert f.readline() == b""
        flood = [socket.create_connection(("127.0.0.1", relay.port), timeout=10)
                 for _ in range(20)]
        answers = []
        for s in flood:
            try:
                answers.append(s.makefile("rb").read())
            except ConnectionResetError:
                answers.append(b"")
            s.close()
        assert set(answers) <= {b"", b"450 too many connections from your address\r\n"}
        # Two held and up to six waiting to be told: the rest were closed without a word.
        assert answers.count(b"") >= 10, answers
        for s in held:
            s.close()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            assert c.noop()[0] == 250
        assert "too many connections from one address: refused 127.0.0.1" in relay.log()


def test_max_connections_overflow_gets_zmailers_450(tmp_path):
    with Relay(tmp_path, ["--max-connections", "2"]) as relay:
        held = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            assert s.makefile("rb").readline().startswith(b"220 ")
            held.append(s)
        try:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as s:
                f = s.makefile("rb")
                assert f.readline() == b"450 Too many simultaneous connections\r\n"
                assert f.readline() == b""
        finally:
            for s in held:
                s.close()


# -- seed 004's EHLO switches (-Z) --------------------------------------------------------

def ehlo_keywords(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        code, text = c.ehlo("client.test")
        assert code == 250
        return text.decode().split("\n")[1:]


def test_ehlo_switches_take_keywords_out(tmp_path):
    forward = ["--forward-to", "127.0.0.1:9"]
    with Relay(tmp_path, forward) as relay:
        assert {"ETRN", "DSN", "8BITMIME"} <= set(ehlo_keywords(relay.port))
    with Relay(tmp_path, forward + ["-Z", "no8bitmime,nodsn", "-Z", "noetrn"],
               name="off") as relay:
        keywords = ehlo_keywords(relay.port)
        assert not {"ETRN", "DSN", "8BITMIME"} & set(keywords), keywords
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.docmd("ETRN", "example.com")[0] == 500
            # 8BITMIME only stops being advertised: 8-bit text is still taken.
            c.sendmail("a@x.test", ["b@y.test"], "Subject: caf\xe9\r\n\r\n\xe9\r\n".encode("latin-1"))


def test_noehlo_makes_clients_fall_back_to_helo(tmp_path):
    with Relay(tmp_path, ["--server-smtp-config", "noehlo"]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            assert c.ehlo("client.test")[0] == 500
            assert c.helo("client.test")[0] == 250
            c.sendmail("a@x.test", ["b@y.test"], "Subject: helo\r\n\r\nbody\r\n")
        assert len(relay.files(".envelope")) == 1


# -- the pure parts -----------------------------------------------------------------------

def test_tarpit_sequence_and_parsing():
    from emailrelay.util import smtp_controls
    pit = smtp_controls.Tarpit(*smtp_controls.parse_tarpit("20,2,300"))
    assert [pit.next_delay() for _ in range(5)] == [20, 60, 180, 300, 300]
    pit = smtp_controls.Tarpit(0, 5, 10)
    assert [pit.next_delay() for _ in range(3)] == [0, 0, 0]


def test_test_address_literals():
    from emailrelay.util import smtp_controls
    assert smtp_controls.parse_test_address("[1.2.3.4]") == "1.2.3.4"
    assert smtp_controls.parse_test_address("[IPv6:2001:DB8::1]") == "2001:db8::1"
    assert smtp_controls.parse_test_address("[ipv6.::ffff:1.2.3.4]") == "::ffff:102:304"


def test_helo_syntax():
    from emailrelay.util import smtp_controls
    good = ["a.example", "localhost", "[10.0.0.1]", "[IPv6:fe80::1]", "b\u00fccher.example",
            "x" * 63 + ".example"]
    bad = ["", "a_b.example", "a..example", ".example", "a-.example", "10.0.0.1",
           "[10.0.0.256]", "[IPv6:10.0.0.1]", "x" * 64 + ".example", "a.example.",
           "a b", "[tag:content]"]
    assert [smtp_controls.valid_helo(x) for x in good] == [True] * len(good)
    assert [smtp_controls.valid_helo(x) for x in bad] == [False] * len(bad)
