"""Running out of file descriptors: the open-files limit, and accept() failing with EMFILE."""

import os
import poplib
import re
import smtplib
import socket
import time

from helpers import Relay, wait_for


def _limit(soft, hard):
    """Runs the program with this open-files limit (prlimit then executes it, same pid)."""
    return ["prlimit", "--nofile=%d:%d" % (soft, hard), "--"]


def _cpu_seconds(pid):
    """User plus system CPU time the process has used (/proc/PID/stat utime + stime)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _soft_limit(pid):
    with open("/proc/%d/limits" % pid) as f:
        return int(re.search(r"^Max open files\s+(\d+)", f.read(), re.M).group(1))


def _first_line(sock):
    sock.settimeout(15)
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = sock.recv(512)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    return data


def _pop_auth(tmp_path):
    path = tmp_path / "pop.auth"
    path.write_text("server plain alice secret\n")
    return ["--pop-auth", str(path)]


def test_out_of_descriptors_is_logged_once_answered_and_does_not_spin(tmp_path):
    relay = Relay(tmp_path, ["--max-connections", "500", "--max-connections-per-address", "500"]
                  + _pop_auth(tmp_path), pop=True, prefix=_limit(64, 64))
    held = []
    try:
        relay.wait_log(r"warning: the open-files limit \(64\) is below the \d+ descriptors "
                       r"--max-connections 500 may need")
        cpu0, wall0 = _cpu_seconds(relay.proc.pid), time.monotonic()
        # Far more connections than descriptors: the kernel completes them
        # all, the relay can accept only some.
        for _ in range(150):
            held.append(socket.create_connection(("127.0.0.1", relay.port), timeout=10))
        replies = [_first_line(s) for s in held]
        assert all(r.startswith((b"220 ", b"450 ")) for r in replies), \
            [r for r in replies if not r.startswith((b"220 ", b"450 "))]
        served = sum(r.startswith(b"220 ") for r in replies)
        assert 10 < served < 64
        assert replies.count(b"450 Too many simultaneous connections\r\n") == 150 - served
        # POP is accepted by the other accept loop: it answers too.
        with socket.create_connection(("127.0.0.1", relay.pop_port), timeout=10) as pop:
            assert _first_line(pop) == b"-ERR too many connections\r\n"
        cpu = _cpu_seconds(relay.proc.pid) - cpu0
        wall = time.monotonic() - wall0
        # A loop retrying accept() would use all the CPU it can get.
        assert cpu < 0.5 * wall + 1.0, (cpu, wall)
        assert len(re.findall(r"cannot accept connections: Too many open files "
                              r"\(open-files limit 64\)", relay.log())) == 1
        for s in held:
            s.close()
        held = []
        # Once the sessions have ended, the next client is served.
        wait_for(lambda: relay.log().count("smtp connection closed") >= served,
                 what="the sessions to end")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: after\r\n\r\nok\r\n")
        relay.wait_log(r"smtp: accepting connections again \(\d+ refused while out of file "
                       r"descriptors\)")
        pop = poplib.POP3("127.0.0.1", relay.pop_port, timeout=10)
        assert pop.getwelcome().startswith(b"+OK")
        pop.quit()
    finally:
        for s in held:
            s.close()
        relay.stop()
    assert len(relay.files(".envelope")) == 1


def test_soft_limit_is_raised_for_max_connections(tmp_path):
    relay = Relay(tmp_path, ["--max-connections", "500"] + _pop_auth(tmp_path), pop=True,
                  prefix=_limit(64, 4096))
    try:
        relay.wait_log(r"open-files limit raised from 64 to 4096 for --max-connections 500")
        assert _soft_limit(relay.proc.pid) == 4096
        assert "below the" not in relay.log()
    finally:
        relay.stop()


def test_soft_limit_is_left_alone_when_it_is_enough(tmp_path):
    relay = Relay(tmp_path, ["--max-connections", "10"], prefix=_limit(256, 4096))
    try:
        wait_for(lambda: "smtp server on" in relay.log(), what="listening")
        assert _soft_limit(relay.proc.pid) == 256
        assert "open-files limit" not in relay.log()
    finally:
        relay.stop()


def test_systemd_units_set_the_open_files_limit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, value in (("emailrelay.service.in", "1024:65536"),
                        ("emailrelay@.service.in", "1024:65536")):
        with open(os.path.join(root, "etc", name)) as f:
            unit = f.read()
        section = re.split(r"^\[Service\]$", unit, flags=re.M)[1].split("\n[", 1)[0]
        assert re.search(r"^LimitNOFILE=%s$" % value, section, re.M), name
