"""--workers N: worker processes serving SMTP on shared sockets, through the real program.

The main process keeps the forwarder: triggers from workers
(--forward-on-disconnect, a filter's exit 103) must reach it. Signals to
the main process reach the workers; a dead worker is restarted. Which
process stored a message shows in its file name (`emailrelay.<pid>....`).
"""

import os
import pwd
import re
import signal
import smtplib
import subprocess
import threading

import pytest

import helpers


def submit(port, n=1, subject="hello"):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        for i in range(n):
            s.sendmail("a@x.test", ["b@y.test"], "Subject: %s %d\r\n\r\nbody\r\n" % (subject, i))


def submit_parallel(port, sessions, per_session):
    """`sessions` SMTP sessions at once, each sending `per_session` messages."""
    errors = []

    def one():
        try:
            submit(port, per_session)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=one) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def worker_pids(relay, count=2):
    """{worker number: pid} of the running workers, from the 'started' log lines."""
    def started():
        found = dict(re.findall(r"worker (\d+) started: pid (\d+)", relay.log()))
        return found if len(found) >= count else None
    return {int(k): int(v) for k, v in helpers.wait_for(started, what="workers").items()}


def children(pid):
    """Child processes of `pid`, whichever of its threads forked them."""
    found = []
    for task in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/children" % (pid, task)) as f:
            found.extend(int(p) for p in f.read().split())
    return sorted(found)


def storing_pids(relay):
    return {int(name.split(".")[1]) for name in relay.files(".envelope")}


def test_one_worker_is_one_process(tmp_path):
    with helpers.Relay(tmp_path, ["--workers", "1"]) as relay:
        submit(relay.port)
        assert len(relay.files(".envelope")) == 1
        assert children(relay.proc.pid) == []
        assert storing_pids(relay) == {relay.proc.pid}


def test_two_workers_store_every_message_and_both_serve(tmp_path):
    args = ["--workers", "2", "--max-connections-per-address", "100"]
    with helpers.Relay(tmp_path, args) as relay:
        pids = worker_pids(relay)
        assert children(relay.proc.pid) == sorted(pids.values())
        sent = 0
        # Which worker accepts is the kernel's choice: send until both have.
        while storing_pids(relay) != set(pids.values()) and sent < 800:
            submit_parallel(relay.port, sessions=10, per_session=8)
            sent += 80
            assert len(relay.files(".envelope")) == sent
        assert storing_pids(relay) == set(pids.values())
        assert relay.files(".envelope.new") == [] and relay.files(".busy") == []
        # A session can still be served by smtp-source's many connections.
        subprocess.run(["smtp-source", "-s", "10", "-m", "100", "-f", "a@x.test", "-t", "b@y.test",
                        "127.0.0.1:%d" % relay.port], check=True, stdout=subprocess.DEVNULL,
                       timeout=60)
        helpers.wait_for(lambda: len(relay.files(".envelope")) == sent + 100,
                         what="every smtp-source message stored")
        assert relay.stop() == 0


def test_forward_on_disconnect_from_a_worker_reaches_the_next_hop(tmp_path):
    with helpers.Relay(tmp_path, name="b") as b:
        args = ["--workers", "2", "--forward-to", "127.0.0.1:%d" % b.port,
                "--forward-on-disconnect", "--poll", "0"]
        with helpers.Relay(tmp_path, args) as a:
            worker_pids(a)
            for i in range(4):
                submit(a.port, subject="m%d" % i)
            helpers.wait_for(lambda: len(b.files(".envelope")) == 4, what="4 messages at b")
            helpers.wait_for(lambda: a.files(".envelope") == [], what="a's spool empty")
            assert a.stop() == 0


def test_filter_rescan_from_a_worker_reaches_the_forwarder(tmp_path):
    with helpers.Relay(tmp_path, name="b") as b:
        args = ["--workers", "2", "--forward-to", "127.0.0.1:%d" % b.port,
                "--filter", "exit:103", "--poll", "0"]
        with helpers.Relay(tmp_path, args) as a:
            worker_pids(a)
            submit(a.port)
            a.wait_log(r"forwarding: \[rescan\]")
            helpers.wait_for(lambda: len(b.files(".envelope")) == 1, what="the message at b")


def test_sigterm_stops_every_worker_with_status_0(tmp_path):
    relay = helpers.Relay(tmp_path, ["--workers", "2", "--pid-file", str(tmp_path / "pid")])
    try:
        pids = worker_pids(relay)
        with open(str(tmp_path / "pid")) as f:
            assert int(f.read()) == relay.proc.pid
        # A session in the middle of a transaction when the stop comes.
        s = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
        s.ehlo()
        s.mail("a@x.test")
        submit(relay.port)
        assert relay.stop() == 0
        s.close()
        for pid in pids.values():
            assert not helpers.alive(pid)
        assert relay.files(".envelope.new") == [] and relay.files(".busy") == []
        assert len(relay.files(".envelope")) == 1
        assert not os.path.exists(str(tmp_path / "pid"))
        assert re.search(r"worker 1 \(pid %d\) exited with status 0" % pids[1], relay.log())
    finally:
        relay.kill()


def test_a_killed_worker_is_logged_and_restarted(tmp_path):
    with helpers.Relay(tmp_path, ["--workers", "2"]) as relay:
        pids = worker_pids(relay)
        os.kill(pids[1], signal.SIGKILL)
        relay.wait_log(r"worker 1 \(pid %d\) killed by signal 9: restarting it" % pids[1])
        new = int(relay.wait_log(r"worker 1 started: pid (?!%d\b)(\d+)" % pids[1]).group(1))
        assert helpers.alive(new) and helpers.alive(pids[2])
        assert children(relay.proc.pid) == sorted([new, pids[2]])
        submit_parallel(relay.port, sessions=4, per_session=5)
        assert len(relay.files(".envelope")) == 20
        assert relay.stop() == 0


def test_sighup_reaches_every_worker(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.write_text("server plain alice secret\n")
    with helpers.Relay(tmp_path, ["--workers", "2", "--server-auth", str(secrets)]) as relay:
        worker_pids(relay)
        relay.wait_log(r"worker serving smtp[\s\S]*worker serving smtp")
        relay.proc.send_signal(signal.SIGHUP)
        helpers.wait_for(lambda: relay.log().count("re-read secrets file") == 3,
                         what="the main process and both workers re-reading secrets")


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege model needs root")
def test_workers_keep_the_user_switch(tmp_path):
    os.chmod(str(tmp_path), 0o755)
    daemon = pwd.getpwnam("daemon")
    with helpers.Relay(tmp_path, ["--workers", "2"], user="daemon") as relay:
        pids = worker_pids(relay)
        out = subprocess.run(["ps", "-o", "pid=,euid=,ruid=", "-p",
                              ",".join(str(p) for p in [relay.proc.pid] + list(pids.values()))],
                             stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
        rows = {int(r.split()[0]): (int(r.split()[1]), int(r.split()[2]))
                for r in out.strip().splitlines()}
        assert rows == {pid: (daemon.pw_uid, 0) for pid in [relay.proc.pid] + list(pids.values())}
        submit(relay.port)
        assert len(relay.files(".envelope")) == 1


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers: 0 is too small"),
    (["--workers", "2", "--immediate", "--forward-to", "127.0.0.1:25"],
     "--immediate cannot be used with --workers more than 1"),
])
def test_usage_errors(args, message):
    done = helpers.run_emailrelay(args + ["--no-daemon"])
    assert done.returncode == 2
    assert message in done.stderr
