"""Several relays on one spool directory: every message is forwarded exactly once.

Relays that share a spool (on one host, or on hosts that mount the same
directory) each store what they receive and each forward the whole spool;
a claim is an flock and a rename, which exactly one of them wins. Here the
relays run in pid namespaces of their own (`unshare --pid`), so that both
have process id 1 as relays on two hosts may: their message ids, which
hold the pid, then collide and must still name distinct files.
(tests/test_haproxy.py runs two relays on one spool behind HAProxy.)
"""

import os
import re
import smtplib
import threading

from helpers import Relay, free_port, stop_process, wait_for
from test_client import dumping_sink, sink_dumps

NAMESPACE = ["unshare", "--pid", "--fork", "--kill-child"]


def test_relays_with_the_same_pid_on_one_spool_forward_each_message_once(tmp_path):
    count = 80
    spool = str(tmp_path / "spool")
    os.makedirs(spool)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    sink_port = free_port()
    sink = dumping_sink(sink_port, dumps, count=200)
    args = ["--forward-to", "127.0.0.1:%d" % sink_port, "--forward-on-disconnect",
            "--poll", "1", "--pid-file", "PIDFILE"]
    relays = []
    try:
        for name in ("r1", "r2"):
            relay = Relay(tmp_path, [a.replace("PIDFILE", str(tmp_path / (name + ".pid")))
                                     for a in args], spool=spool, name=name, prefix=NAMESPACE)
            relays.append(relay)
        for name in ("r1", "r2"):
            with open(str(tmp_path / (name + ".pid"))) as f:
                assert f.read().strip() == "1"
        errors = []

        def client(relay, numbers):
            try:
                with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
                    for n in numbers:
                        smtp.sendmail("a@x.test", ["b@y.test"],
                                      "Subject: n%d\r\n\r\nhello\r\n" % n)
            except Exception as e:
                errors.append(e)
        # Two sessions on each relay, all at once.
        threads = [threading.Thread(target=client, args=(relays[k % 2], range(k, count, 4)))
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        wait_for(lambda: len(os.listdir(str(dumps))) >= count
                 and not [n for n in os.listdir(spool) if ".envelope" in n],
                 60, what="every message forwarded")
        for relay in relays:
            assert relay.stop() == 0
            assert re.search(r"forwarding: [1-9]\d* message\(s\) sent", relay.log())
    finally:
        for relay in relays:
            relay.stop()
        stop_process(sink)
    received = [d for d in sink_dumps(dumps)]
    subjects = sorted(re.search(rb"Subject: (n\d+)\r?\n", d).group(1).decode() for d in received)
    assert subjects == sorted("n%d" % n for n in range(count))
    ids = [re.search(rb"by relay\.test with ESMTP id (emailrelay\.\d+\.\d+\.\d+);", d).group(1)
           for d in received]
    assert len(set(ids)) == count and all(i.startswith(b"emailrelay.1.") for i in ids)
