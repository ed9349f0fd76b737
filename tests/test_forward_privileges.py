"""Forwarding under the privilege model: one root window per message.

After --user, each spool operation runs in a root window, and every
opening or closing of one switches the effective user id process-wide
(glibc signals every thread for it). A forwarding pass does the spool work
between two messages in one window, so a pass over N messages opens about
N windows (plus one per clean-up batch), none of its own while talking to
the next hop; windows are balanced at the end. The same pass keeps the rules: a message leaves the spool only
once the next hop took it, a refused one becomes `.bad` with its reason, a
deferred one stays queued; run as root, the files written in those windows
belong to root and the --user group with mode 0660.
"""

import os
import pwd
import stat

import pytest

import helpers
from emailrelay.forward import deletions, forwarder as forwarder_mod
from emailrelay.runtime import process
from emailrelay.forward import smtp_client
from emailrelay.store import spool as spool_mod
from test_client import ScriptedServer, make_cfg, put_message
from test_forward_faults import bad_reason

BODY = b"Subject: window\r\n\r\nbody\r\n"


def fill(spool_dir, count, refused=None, deferred=None):
    """`count` messages; the 6th to `refused`, the 11th to `deferred` (when given)."""
    ids = []
    for i in range(count):
        to = "b%d@y.test" % i
        if i == 5 and refused:
            to = refused
        if i == 10 and deferred:
            to = deferred
        ids.append(put_message(spool_dir, BODY, to=(to,)))
    return ids


@pytest.fixture
def fake_switch(monkeypatch):
    """Makes the process believe it switched to --user, counting the switches.

    Nothing really changes ids: the windows' id switches only record the calls.
    Returns the list of (function, id) calls.
    """
    calls = []
    monkeypatch.setattr(process, "_user_ids", (4242, 4242))
    monkeypatch.setattr(process, "_seteuid", lambda uid: calls.append(("seteuid", uid)))
    monkeypatch.setattr(process, "_setegid", lambda gid: calls.append(("setegid", gid)))
    return calls


def test_a_pass_takes_one_root_window_per_message_and_none_while_sending(
        tmp_path, monkeypatch, fake_switch):
    count = 20
    ids = fill(tmp_path, count, refused="bad@y.test", deferred="later@y.test")
    del fake_switch[:]  # (storing them took windows too)
    # The clean-up thread's window (one a batch) would give root to this
    # thread too: here it runs once, at the end.
    monkeypatch.setattr(deletions.Deletions, "BATCH", count)
    windows_at_send = []
    real_send = smtp_client.Client.send

    def send(self, *args, **kwargs):
        windows_at_send.append(process._uid_windows)
        return real_send(self, *args, **kwargs)
    monkeypatch.setattr(smtp_client.Client, "send", send)
    server = ScriptedServer(reject={"bad@y.test": b"550 5.1.1 no such user",
                                    "later@y.test": b"452 4.2.2 mailbox full"})
    try:
        cfg = make_cfg(tmp_path, server.port, "--retry-interval", "60")
        result = forwarder_mod.Forwarder(cfg, spool_mod.Spool(str(tmp_path))).run_pass(force=True)
    finally:
        server.close()
    assert (result.sent, result.failed, result.deferred) == (count - 2, 1, 1)
    assert windows_at_send and set(windows_at_send) == {0}
    opened = [c for c in fake_switch if c == ("seteuid", 0)]
    closed = [c for c in fake_switch if c == ("seteuid", 4242)]
    # One window per message and one that finds the spool empty, one each
    # for failing and deferring a message and the clean-up thread's (the
    # old code took four or five per message).
    assert len(opened) == len(closed) <= count + 1 + 2 + 1, fake_switch
    assert not [c for c in fake_switch if c[0] == "setegid"]
    assert process._uid_windows == 0 and process._gid_windows == 0
    names = os.listdir(str(tmp_path))
    assert sorted(n for n in names if n.endswith(".content")) == \
        sorted([ids[5] + ".content", ids[10] + ".content"])
    assert sorted(n for n in names if ".envelope" in n) == \
        sorted([ids[5] + ".envelope.bad", ids[10] + ".envelope"])
    assert b"no such user" in bad_reason(tmp_path, ids[5])


def test_a_pass_without_pipelining_or_with_nothing_to_send_keeps_windows_balanced(
        tmp_path, fake_switch):
    empty = forwarder_mod.Forwarder(make_cfg(tmp_path, 9), spool_mod.Spool(str(tmp_path)))
    assert empty.run_pass(force=True).processed == 0
    assert len(fake_switch) == 2 and process._uid_windows == 0
    ids = fill(tmp_path, 3)
    del fake_switch[:]
    server = ScriptedServer(extensions=("8BITMIME",))
    try:
        result = forwarder_mod.Forwarder(make_cfg(tmp_path, server.port),
                                         spool_mod.Spool(str(tmp_path))).run_pass(force=True)
    finally:
        server.close()
    assert result.sent == 3 and len(server.sessions[0]["messages"]) == 3
    assert not os.listdir(str(tmp_path)), ids
    assert process._uid_windows == 0
    assert fake_switch.count(("seteuid", 0)) == fake_switch.count(("seteuid", 4242)) <= 3 + 1 + 1


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege model needs root")
def test_as_root_forwarding_keeps_file_ownership_and_the_durability_rules(tmp_path):
    daemon = pwd.getpwnam("daemon")
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    os.chmod(str(spool_dir), 0o700)
    count = 12
    ids = fill(spool_dir, count, refused="bad@y.test", deferred="later@y.test")
    server = ScriptedServer(reject={"bad@y.test": b"550 5.1.1 no such user",
                                    "later@y.test": b"452 4.2.2 mailbox full"})
    try:
        proc = helpers.run_emailrelay(["--as-client", "127.0.0.1:%d" % server.port,
                                       "--spool-dir", str(spool_dir), "--retry-interval", "60",
                                       "--no-syslog"])
        got = [m for s in list(server.sessions) for m in list(s["messages"])]
    finally:
        server.close()
    # Not every message went (one failed, one waits): exit 1, no traceback.
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(got) == count - 2
    names = sorted(os.listdir(str(spool_dir)))
    assert names == sorted([ids[5] + ".content", ids[5] + ".envelope.bad",
                            ids[10] + ".content", ids[10] + ".envelope"])
    assert b"no such user" in bad_reason(spool_dir, ids[5])
    # The deferred envelope was written anew (retry state) in a root window.
    with open(str(spool_dir / (ids[10] + ".envelope")), "rb") as f:
        assert b"4.2.2 mailbox full" in f.read()
    # Appended to or only read: as the test wrote them.
    for name in (ids[5] + ".content", ids[5] + ".envelope.bad", ids[10] + ".content"):
        st = os.stat(str(spool_dir / name))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o660), name
    st = os.stat(str(spool_dir / (ids[10] + ".envelope")))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, daemon.pw_gid, 0o660)
