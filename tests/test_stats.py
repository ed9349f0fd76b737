"""The one statistics object: counted by sessions and the forwarder, read by `status`."""

import smtplib
import subprocess
import threading

from emailrelay.util.stats import Stats
from helpers import Relay, free_port, stop_process, wait_for, wait_port
from test_admin import Admin


def test_counters_from_many_threads_are_exact_and_snapshots_are_copies():
    stats = Stats(["a", "b"])
    assert stats.snapshot() == {"a": 0, "b": 0}

    def bump():
        for _ in range(10000):
            stats.increment("a")
            stats.increment("c")

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap == {"a": 40000, "b": 0, "c": 40000}
    snap["a"] = 0
    assert stats.snapshot()["a"] == 40000


def test_admin_status_counts_sessions_and_forwarding_together(tmp_path):
    sink_port = free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "127.0.0.1:%d" % sink_port, "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(sink_port)
        with Relay(tmp_path, ["--forward-to", "127.0.0.1:%d" % sink_port,
                              "--forward-on-disconnect", "--max-connections-per-address", "50"],
                   admin=True) as relay:
            def send():
                with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
                    c.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")

            senders = [threading.Thread(target=send) for _ in range(20)]
            for t in senders:
                t.start()
            for t in senders:
                t.join()
            admin = Admin(relay.admin_port)
            try:
                def counted():
                    text = admin.cmd("status")
                    return "messages-forwarded: 20" in text and text
                text = wait_for(counted, what="20 forwarded in status")
                assert "messages-stored: 20" in text
                assert "messages-failed: 0" in text
            finally:
                admin.close()
    finally:
        stop_process(sink)
