"""--dnsbl against a real DNS server (dnsmasq) with a test zone.

bl.test and bl2.test list 127.0.0.2; ok.test lists nothing; slow.test is
forwarded to a UDP socket that never answers. Clients connect from
127.0.0.2 or 127.0.0.3 (second loopback addresses) with the local-address
exemption turned off through EMAILRELAY_DNSBL_CHECK_LOCAL=1.
"""

import smtplib
import socket
import subprocess
import time

import pytest

from emailrelay.util import dns
from emailrelay.policy import dnsbl
from helpers import Relay, free_port, run_emailrelay, wait_for


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("dns")
    hosts = d / "hosts"
    hosts.write_text("127.0.0.2 2.0.0.127.bl.test\n127.0.0.2 2.0.0.127.bl2.test\n")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    port = free_port()
    proc = subprocess.Popen(
        ["dnsmasq", "--no-daemon", "--port=%d" % port, "--listen-address=127.0.0.1",
         "--bind-interfaces", "--no-resolv", "--no-hosts", "--addn-hosts=%s" % hosts,
         "--local=/bl.test/", "--local=/bl2.test/", "--local=/ok.test/", "--pid-file=",
         "--server=/slow.test/127.0.0.1#%d" % silent.getsockname()[1]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(0.2)
            u.sendto(dns.query("2.0.0.127.bl.test", dns.A, 1), ("127.0.0.1", port))
            try:
                return dns.parse(u.recv(512)).addresses() == ["127.0.0.2"]
            except OSError:
                return False
    try:
        wait_for(answers, 15, what="dnsmasq to answer")
        yield "127.0.0.1:%d" % port
    finally:
        proc.terminate()
        proc.wait(10)
        silent.close()


def greeting(port, source):
    """Everything the relay says to a client from `source` until it closes (after QUIT)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20,
                                  source_address=(source, 0)) as s:
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return data.decode()
            data += chunk
        if data.startswith(b"220"):
            s.sendall(b"QUIT\r\n")
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return data.decode()
            data += chunk


@pytest.fixture
def check_local(monkeypatch):
    monkeypatch.setenv("EMAILRELAY_DNSBL_CHECK_LOCAL", "1")


def test_listed_client_is_refused_with_the_lists(tmp_path, dns_server, check_local):
    with Relay(tmp_path, ["--dnsbl", "bl.test,ok.test,bl2.test,1,5000," + dns_server]) as relay:
        text = greeting(relay.port, "127.0.0.2")
        assert text.startswith("554 client address 127.0.0.2 is blocked by ") and "127.0.0.2" in text
        assert "bl.test" in text and "ok.test" not in text
        assert text.count("\r\n") == 1
        relay.wait_log(r"warning: dnsbl: client address \[127\.0\.0\.2\] blocked by \[bl\.test\]")
        assert greeting(relay.port, "127.0.0.3").startswith("220 ")
        relay.wait_log(r"dnsbl: address \[127\.0\.0\.3\] allowed by \[ok\.test\]")


def test_rejection_delayed_to_rcpt(tmp_path, dns_server, check_local):
    # Seed 004's "delayed rejection by RBL": the client is greeted, its MAIL
    # accepted and every recipient refused with a 5xx it can log.
    args = ["--dnsbl", "bl.test,1,5000," + dns_server, "-Z", "rcpt-dns-rbl"]
    with Relay(tmp_path, args) as relay:
        with smtplib.SMTP(timeout=20, source_address=("127.0.0.2", 0)) as c:
            assert c.connect("127.0.0.1", relay.port)[0] == 220
            assert c.ehlo("client.test")[0] == 250
            assert c.mail("a@x.test")[0] == 250
            for rcpt in ("b@y.test", "c@y.test"):
                assert c.rcpt(rcpt) == (
                    550, b"client address 127.0.0.2 is blocked by bl.test")
            assert c.docmd("DATA")[0] == 554
        with smtplib.SMTP(timeout=20, source_address=("127.0.0.3", 0)) as c:
            c.connect("127.0.0.1", relay.port)
            c.sendmail("a@x.test", ["b@y.test"], "Subject: ok\r\n\r\nbody\r\n")
        assert len(relay.files(".envelope")) == 1
        assert "dnsbl: client address [127.0.0.2] blocked by [bl.test]" in relay.log()


def test_threshold_two_needs_two_lists(tmp_path, dns_server, check_local):
    with Relay(tmp_path, ["--dnsbl", "bl.test,ok.test,2,5000," + dns_server]) as relay:
        assert greeting(relay.port, "127.0.0.2").startswith("220 ")
    with Relay(tmp_path, ["--dnsbl", "bl.test,bl2.test,ok.test,2,5000," + dns_server],
               name="two") as relay:
        text = greeting(relay.port, "127.0.0.2")
        assert text.startswith("554 client address 127.0.0.2 is blocked by ") and "bl.test, bl2.test" in text
        relay.wait_log(r"blocked by \[bl\.test\] \[bl2\.test\]")


def test_threshold_zero_only_logs(tmp_path, dns_server, check_local):
    with Relay(tmp_path, ["--dnsbl", "bl.test,ok.test,0,5000," + dns_server]) as relay:
        assert greeting(relay.port, "127.0.0.2").startswith("220 ")
        relay.wait_log(r"dnsbl: address \[127\.0\.0\.2\] denied by \[bl\.test\]: 127\.0\.0\.2")
        assert "blocked" not in relay.log()


def test_old_configuration_form(tmp_path, dns_server, check_local):
    with Relay(tmp_path, ["--dnsbl", dns_server + ",2000,1,bl.test"]) as relay:
        assert greeting(relay.port, "127.0.0.2").startswith("554 client address 127.0.0.2 is blocked by ")
        assert greeting(relay.port, "127.0.0.3").startswith("220 ")


def test_silent_list_allows_after_the_timeout(tmp_path, dns_server, check_local):
    with Relay(tmp_path, ["--dnsbl", "ok.test,slow.test,1,700," + dns_server]) as relay:
        start = time.monotonic()
        assert greeting(relay.port, "127.0.0.3").startswith("220 ")
        assert time.monotonic() - start >= 0.6
        relay.wait_log(r"warning: dnsbl: client address \[127\.0\.0\.3\]: timeout: "
                       r"no answer from \[slow\.test\]")


def test_silent_list_denies_with_a_negative_timeout(tmp_path, dns_server, check_local):
    with Relay(tmp_path, ["--dnsbl", "ok.test,slow.test,1,-700," + dns_server]) as relay:
        text = greeting(relay.port, "127.0.0.3")
        assert text.startswith("421 cannot check the client address"), text
        relay.wait_log(r"warning: dnsbl: client address \[127\.0\.0\.3\] blocked: timeout: "
                       r"no answer from \[slow\.test\]")


def test_outcome_decided_before_the_silent_list_answers(tmp_path, dns_server, check_local):
    with Relay(tmp_path, ["--dnsbl", "bl.test,slow.test,1,20s," + dns_server]) as relay:
        start = time.monotonic()
        assert greeting(relay.port, "127.0.0.2").startswith("554 ")
        assert time.monotonic() - start < 10
    with Relay(tmp_path, ["--dnsbl", "ok.test,slow.test,2,20s," + dns_server],
               name="allow") as relay:
        start = time.monotonic()
        assert greeting(relay.port, "127.0.0.2").startswith("220 ")
        assert time.monotonic() - start < 10


def test_local_addresses_are_not_checked_by_default(tmp_path, dns_server, monkeypatch):
    monkeypatch.delenv("EMAILRELAY_DNSBL_CHECK_LOCAL", raising=False)
    with Relay(tmp_path, ["--dnsbl", "bl.test,1,5000," + dns_server]) as relay:
        assert greeting(relay.port, "127.0.0.2").startswith("220 ")
        relay.wait_log(r"dnsbl: not checking local address \[127\.0\.0\.2\]")


@pytest.mark.parametrize("config,message", [
    ("127.0.0.1:53,1000,1", "expected dns-server,timeout,threshold,list"),
    ("bl.test,1,5000,127.0.0.1:53,extra", "unused fields"),
    ("bl.test,-1", "invalid threshold"),
    ("bl..test", "invalid name"),
    ("bl.test,1,soon", "invalid timeout"),
    ("bl.test,1,5000,dns.example.com", "must be an IP address"),
])
def test_bad_configuration_stops_start_up(tmp_path, config, message):
    r = run_emailrelay(["--no-daemon", "--spool-dir", str(tmp_path), "--user", "root",
                        "--port", str(free_port()), "--dnsbl", config], timeout=20)
    assert r.returncode == 1
    assert "--dnsbl: " in r.stderr and message in r.stderr


def test_parse_forms_and_defaults(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver 1.1.1.1\n")
    d = dnsbl.Dnsbl.parse("zen.example.org", resolv_conf=str(resolv))
    assert (d.lists, d.threshold, d.timeout, d.allow_on_timeout, d.server) == \
        (["zen.example.org"], 1, 5.0, True, ("192.0.2.53", 53))
    d = dnsbl.Dnsbl.parse("a.test,b.test,2,-3s,[::1]:5353")
    assert (d.lists, d.threshold, d.timeout, d.allow_on_timeout, d.server) == \
        (["a.test", "b.test"], 2, 3.0, False, ("::1", 5353))
    d = dnsbl.Dnsbl.parse("10.0.0.1:53,-1500,0,a.test,b.test")
    assert (d.lists, d.threshold, d.timeout, d.allow_on_timeout, d.server) == \
        (["a.test", "b.test"], 0, 1.5, True, ("10.0.0.1", 53))
    assert dnsbl.default_server(str(tmp_path / "missing")) == ("127.0.0.1", 53)


def test_version_and_help_document_the_network_forms():
    r = run_emailrelay(["--version", "--verbose"])
    assert r.returncode == 0 and "DNSBL: enabled" in r.stdout
    assert "not implemented" not in r.stdout
    r = run_emailrelay(["--help", "--verbose"])
    text = " ".join(r.stdout.split())
    for example in ("net:127.0.0.1:10025", "net:/run/filter.sock", "spam:127.0.0.1:783",
                    "spam-edit:<transport-address>", "net:127.0.0.1:10026",
                    "zen.spamhaus.org,bl.spamcop.net,1,2s", "127.0.0.1:53,1000,1,zen.spamhaus.org",
                    "ppp0-ipv4"):
        assert example in text
    assert "not implemented" not in text
