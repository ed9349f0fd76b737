"""The spool: durable storing, states, claiming between processes, recovery."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import helpers
from emailrelay.store import spool as spool_mod
from emailrelay.store import spool_files
from emailrelay.store.envelope import Envelope
from emailrelay.store.spool import Spool, SpoolError


@pytest.fixture
def logged(monkeypatch):
    lines = []
    monkeypatch.setattr(spool_files, "log_event", lambda level, text: lines.append((level, text)))
    return lines


def store(spool, body=b"Subject: test\r\n\r\nbody\r\n", **fields):
    fields.setdefault("from_", "a@example.com")
    fields.setdefault("to_remote", ["b@example.net"])
    env = Envelope(client="127.0.0.1:1000", **fields)
    m = spool.new_message()
    m.write(body)
    m.commit_content()
    m.write_envelope(env)
    return m, m.finish(env)


def names(directory):
    return sorted(n for n in os.listdir(str(directory)) if not os.path.isdir(os.path.join(str(directory), n)))


def child(code, *args):
    """Starts a Python child running `code` with the tree importable."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)] + [str(a) for a in args],
                            env=helpers.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            universal_newlines=True)


CLAIM_AND_WAIT = """
    import sys
    from emailrelay.store.spool import Spool
    c = Spool(sys.argv[1]).claim(sys.argv[2])
    print("claimed" if c else "lost", flush=True)
    sys.stdin.read()
"""


def test_store_commits_both_files_with_mode_0660(tmp_path):
    s = Spool(str(tmp_path))
    m, mid = store(s)
    assert mid == m.id and mid.startswith("emailrelay.%d." % os.getpid())
    assert names(tmp_path) == [mid + ".content", mid + ".envelope"]
    for n in names(tmp_path):
        assert os.stat(str(tmp_path / n)).st_mode & 0o777 == 0o660
    assert (tmp_path / (mid + ".content")).read_bytes() == b"Subject: test\r\n\r\nbody\r\n"
    assert Envelope.read(str(tmp_path / (mid + ".envelope"))).to_remote == ["b@example.net"]
    assert m.size == len(b"Subject: test\r\n\r\nbody\r\n")
    assert s.ids() == [mid]
    assert s.list_messages() == [(mid, "ready")]


def test_new_envelope_is_visible_to_filters_before_finish(tmp_path):
    s = Spool(str(tmp_path))
    m = s.new_message()
    m.write(b"x\r\n")
    m.commit_content()
    env = Envelope(from_="a@b", to_remote=["c@d"])
    m.write_envelope(env)
    assert os.path.exists(m.new_envelope_path) and s.ids() == []
    assert s.list_messages() == [(m.id, "new")]
    with open(m.new_envelope_path, "ab") as f:  # a filter edits the envelope
        f.write(b"X-Filter: was here\r\n")
    m.finish(env)
    assert (tmp_path / (m.id + ".envelope")).read_bytes().endswith(b"X-Filter: was here\r\n")


def test_local_recipients_get_a_local_envelope(tmp_path):
    s = Spool(str(tmp_path))
    _, only_local = store(s, to_local=["postmaster"], to_remote=[])
    _, mixed = store(s, to_local=["postmaster"], to_remote=["x@y"])
    assert names(tmp_path) == sorted([only_local + ".content", only_local + ".envelope.local",
                                      mixed + ".content", mixed + ".envelope", mixed + ".envelope.local"])
    assert s.ids() == [mixed]
    c = s.claim(mixed)
    c.delete()
    # The content is still needed by the .local envelope.
    assert os.path.exists(str(tmp_path / (mixed + ".content")))
    assert not os.path.exists(str(tmp_path / (mixed + ".envelope.busy")))


def test_abandon_leaves_nothing_and_may_repeat(tmp_path):
    s = Spool(str(tmp_path))
    m = s.new_message()
    m.write(b"partial")
    m.abandon()
    m.abandon()
    m2 = s.new_message()
    m2.write(b"x")
    m2.commit_content()
    m2.write_envelope(Envelope(from_="a", to_remote=["b"]))
    m2.abandon()
    assert names(tmp_path) == []


def test_finish_fails_if_a_filter_removed_the_files(tmp_path):
    s = Spool(str(tmp_path))
    m = s.new_message()
    m.commit_content()
    m.write_envelope(Envelope(from_="a", to_remote=["b"]))
    os.unlink(m.new_envelope_path)
    with pytest.raises(SpoolError):
        m.finish(Envelope(from_="a", to_remote=["b"]))
    m.abandon()
    assert names(tmp_path) == []


def test_bad_spool_directory(tmp_path):
    with pytest.raises(SpoolError):
        Spool(str(tmp_path / "missing"))


def test_ids_skip_a_taken_name(tmp_path, monkeypatch):
    class FixedClock:
        @staticmethod
        def time():
            return 1700000000.5
    monkeypatch.setattr(spool_mod, "time", FixedClock)
    monkeypatch.setattr(spool_mod, "_sequence", iter(range(7, 100)))
    taken = "emailrelay.%d.1700000000.7" % os.getpid()
    (tmp_path / (taken + ".content")).write_bytes(b"someone else's")
    m = Spool(str(tmp_path)).new_message()
    assert m.id == "emailrelay.%d.1700000000.8" % os.getpid()
    assert (tmp_path / (taken + ".content")).read_bytes() == b"someone else's"
    m.abandon()


def test_ids_unique_across_processes(tmp_path):
    code = """
        import sys
        from emailrelay.store.spool import Spool
        s = Spool(sys.argv[1])
        for _ in range(200):
            m = s.new_message()
            m.write(b"x")
            m.commit_content()
            print(m.id)
    """
    procs = [child(code, tmp_path) for _ in range(3)]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        ids += out.split()
    assert len(ids) == 600 and len(set(ids)) == 600
    assert len(os.listdir(str(tmp_path))) == 600


def test_ids_oldest_first_and_odd_files_ignored(tmp_path):
    s = Spool(str(tmp_path))
    for n in ("emailrelay.9.1700000005.1", "emailrelay.3.1700000001.2", "emailrelay.3.1700000001.10"):
        (tmp_path / (n + ".envelope")).write_bytes(b"x")
    (tmp_path / "dir.envelope").mkdir()
    (tmp_path / ".hidden.envelope").write_bytes(b"x")
    (tmp_path / ".envelope").write_bytes(b"x")
    (tmp_path / "README").write_bytes(b"x")
    os.symlink("/nonexistent", str(tmp_path / "dangling.envelope"))
    assert s.ids() == ["emailrelay.3.1700000001.2", "emailrelay.3.1700000001.10", "emailrelay.9.1700000005.1"]


def test_claim_release_delete(tmp_path):
    s = Spool(str(tmp_path))
    _, mid = store(s)
    c = s.claim(mid)
    assert c.envelope.to_remote == ["b@example.net"]
    assert c.content_path == str(tmp_path / (mid + ".content"))
    assert names(tmp_path) == [mid + ".content", mid + ".envelope.busy"]
    assert s.ids() == [] and s.claim(mid) is None
    c.release()
    assert s.ids() == [mid]
    c = s.claim(mid)
    c.delete()
    assert names(tmp_path) == []


def test_fail_appends_reason_and_unfail(tmp_path):
    s = Spool(str(tmp_path))
    _, mid = store(s)
    s.claim(mid).fail("550 5.1.1 no such user", 550)
    bad = tmp_path / (mid + ".envelope.bad")
    assert bad.read_bytes().endswith(b"X-MailRelay-End: 1\r\nX-MailRelay-Reason: 550 5.1.1 no such user\r\n"
                                     b"X-MailRelay-ReasonCode: 550\r\n")
    assert s.failures() == [(mid, "550 5.1.1 no such user")]
    assert s.list_messages() == [(mid, "bad")]
    assert s.unfail_all() == 1
    assert s.ids() == [mid] and s.failures() == []
    s.claim(mid).fail("timed out")
    assert s.failures() == [(mid, "timed out")]
    assert Envelope.read(str(bad)).reasons() == ["550 5.1.1 no such user", "timed out"]


def test_rewrite_keeps_the_claim(tmp_path):
    s = Spool(str(tmp_path))
    _, mid = store(s)
    c = s.claim(mid)
    env = c.envelope
    env.to_remote = ["changed@example.org"]
    c.rewrite(env)
    s.recover()  # the lock moved to the new file with it
    assert names(tmp_path) == [mid + ".content", mid + ".envelope.busy"]
    c.release()
    assert Envelope.read(str(tmp_path / (mid + ".envelope"))).to_remote == ["changed@example.org"]


def test_corrupt_envelope_is_marked_bad(tmp_path, logged):
    s = Spool(str(tmp_path))
    _, good = store(s)
    corrupt = "emailrelay.1.1600000000.1"
    (tmp_path / (corrupt + ".envelope")).write_bytes(b"X-MailRelay-Format: #2821.8\r\ngarbage\r\n")
    (tmp_path / (corrupt + ".content")).write_bytes(b"x")
    assert s.ids() == [corrupt, good]
    assert s.claim(corrupt) is None
    assert (corrupt, "bad") in s.list_messages()
    reason = dict(s.failures())[corrupt]
    assert reason.startswith("invalid envelope file: bad envelope line")
    assert any(corrupt in text for level, text in logged)
    assert s.claim(good) is not None


def test_two_processes_claim_each_message_exactly_once(tmp_path):
    s = Spool(str(tmp_path))
    ids = [store(s)[1] for _ in range(150)]
    go = tmp_path / "go"
    code = """
        import os, sys, time
        from emailrelay.store.spool import Spool
        s = Spool(sys.argv[1])
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.001)
        for mid in s.ids():
            c = s.claim(mid)
            if c is not None:
                print(mid, flush=True)
                c.delete()
    """
    procs = [child(code, tmp_path, go) for _ in range(2)]
    go.mkdir()
    got = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        got.append(out.split())
    assert sorted(got[0] + got[1]) == sorted(ids)
    assert not set(got[0]) & set(got[1])
    assert names(tmp_path) == []


def test_busy_of_a_killed_forwarder_is_recovered(tmp_path, logged):
    s = Spool(str(tmp_path))
    _, mid = store(s)
    p = child(CLAIM_AND_WAIT, tmp_path, mid)
    assert p.stdout.readline().strip() == "claimed"
    s.recover()  # owner alive: its claim is left alone
    assert names(tmp_path) == [mid + ".content", mid + ".envelope.busy"]
    assert s.claim(mid) is None
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=10)
    s.recover()
    assert s.ids() == [mid]
    assert any(mid in text for level, text in logged)
    assert s.claim(mid).envelope.from_ == "a@example.com"


def test_own_claims_are_not_recovered(tmp_path):
    s = Spool(str(tmp_path))
    _, mid = store(s)
    c = s.claim(mid)
    Spool(str(tmp_path)).recover()
    assert s.ids() == []
    c.release()


def test_unfinished_new_message_of_a_dead_process_is_removed(tmp_path, logged):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stem = "emailrelay.%d.1700000000.1" % dead.pid
    (tmp_path / (stem + ".content")).write_bytes(b"half a message")
    (tmp_path / (stem + ".envelope.new")).write_bytes(b"X-MailRelay-Format: #2821.8\r\n")
    s = Spool(str(tmp_path))
    live = s.new_message()
    live.commit_content()
    live.write_envelope(Envelope(from_="a", to_remote=["b"]))
    s.recover()
    assert sorted(os.listdir(str(tmp_path))) == sorted([live.id + ".content",
                                                        live.id + ".envelope.new"])
    assert s.ids() == []
    assert any("removed unacknowledged message %s" % stem in text and level == "warning"
               for level, text in logged)
    live.finish(Envelope(from_="a", to_remote=["b"]))
    assert s.ids() == [live.id]


def test_content_shared_with_pop_copies(tmp_path):
    s = Spool(str(tmp_path))
    _, mid = store(s)
    for user in ("alice", "bob"):
        (tmp_path / user).mkdir()
        (tmp_path / user / (mid + ".envelope")).write_bytes((tmp_path / (mid + ".envelope")).read_bytes())
    s.claim(mid).delete()  # forwarded; the POP copies still need the content
    content = str(tmp_path / (mid + ".content"))
    assert os.path.exists(content)
    [alice] = s.committed("alice")
    assert alice == (mid, str(tmp_path / "alice" / (mid + ".envelope")), content)
    assert s.committed(str(tmp_path / "bob"))[0].content_path == content
    s.remove_envelope(alice.envelope_path, alice.content_path)
    assert os.path.exists(content) and s.committed("alice") == []
    bob = s.committed("bob")[0]
    s.remove_envelope(bob.envelope_path, bob.content_path)
    assert not os.path.exists(content)


def test_committed_in_the_main_directory(tmp_path):
    s = Spool(str(tmp_path))
    _, mid = store(s)
    assert s.committed() == [(mid, str(tmp_path / (mid + ".envelope")), str(tmp_path / (mid + ".content")))]
    s.remove_envelope(*s.committed()[0][1:])
    assert names(tmp_path) == []


def test_streaming_a_50mb_message_keeps_memory_bounded(tmp_path):
    code = """
        import resource, sys
        from emailrelay.store.spool import Spool
        from emailrelay.store.envelope import Envelope
        s = Spool(sys.argv[1])
        m = s.new_message()
        block = (b"x" * 998 + b"\\r\\n") * 64
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(50 * 1024 * 1024 // len(block)):
            m.write(block)
        m.commit_content()
        env = Envelope(from_="a", to_remote=["b"])
        m.write_envelope(env)
        m.finish(env)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(after - before, m.size)
    """
    p = child(code, tmp_path)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    growth_kib, size = map(int, out.split())
    assert size >= 50 * 1024 * 1024 - 64 * 1000
    assert growth_kib < 8 * 1024, "memory grew by %d KiB" % growth_kib
    [mid] = Spool(str(tmp_path)).ids()
    assert os.path.getsize(str(tmp_path / (mid + ".content"))) == size


def test_disown_leaves_the_files_to_the_filter(tmp_path):
    s = Spool(str(tmp_path))
    m = s.new_message()
    m.write(b"x")
    m.commit_content()
    m.write_envelope(Envelope(from_="a", to_remote=["b"]))
    os.unlink(m.new_envelope_path)  # what a filter that exits 100 may do
    m.disown()
    m.abandon()
    assert names(tmp_path) == [m.id + ".content"]
    assert s.list_messages() == []
