"""bin/emailrelay-resubmit: failed messages go back to the queue a limited number of times."""

import os
import subprocess
import sys

import helpers
from emailrelay.store.envelope import Envelope
from emailrelay.store.spool import Spool

RESUBMIT = os.path.join(helpers.BIN, "emailrelay-resubmit")


def resubmit(args):
    return subprocess.run([sys.executable, RESUBMIT] + [str(a) for a in args], env=helpers.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=30)


def failed_message(spool, failures):
    env = Envelope(from_="a@b", to_remote=["c@d"])
    m = spool.new_message()
    m.commit_content()
    m.write_envelope(env)
    mid = m.finish(env)
    for n in range(failures):
        spool.claim(mid).fail("attempt %d failed" % (n + 1), 451)
        if n + 1 < failures:
            spool.unfail_all()
    return mid


def test_resubmits_below_the_limit_and_keeps_history(tmp_path):
    s = Spool(str(tmp_path))
    once = failed_message(s, 1)
    four = failed_message(s, 4)
    five = failed_message(s, 5)
    r = resubmit(["--spool-dir", tmp_path, "--verbose"])
    assert r.returncode == 0, r.stderr
    assert sorted(s.ids()) == sorted([once, four])
    assert [mid for mid, _ in s.failures()] == [five]
    assert "%s.envelope.bad: 5 failures: left" % five in r.stdout
    # The reasons stay, so the count goes on from where it was.
    assert Envelope.read(s.path(four, ".envelope")).reasons()[-1] == "attempt 4 failed"
    s.claim(four).fail("attempt 5 failed", 451)
    assert resubmit([tmp_path]).returncode == 0  # the script's positional form
    assert sorted(mid for mid, _ in s.failures()) == sorted([four, five])


def test_retries_option(tmp_path):
    s = Spool(str(tmp_path))
    two = failed_message(s, 2)
    assert resubmit(["-s", tmp_path, "--retries", "2"]).returncode == 0
    assert s.ids() == []
    assert resubmit(["-s", tmp_path, "-r", "3"]).returncode == 0
    assert s.ids() == [two]


def test_only_bad_files_are_touched(tmp_path):
    s = Spool(str(tmp_path))
    bad = failed_message(s, 1)
    busy_id = failed_message(s, 0)
    claim = s.claim(busy_id)
    (tmp_path / "notes.txt").write_text("x")
    before = sorted(os.listdir(str(tmp_path)))
    assert resubmit(["-s", tmp_path]).returncode == 0
    after = sorted(os.listdir(str(tmp_path)))
    assert sorted(set(before) - set(after)) == [bad + ".envelope.bad"]
    assert sorted(set(after) - set(before)) == [bad + ".envelope"]
    claim.release()


def test_bad_spool_directory(tmp_path):
    r = resubmit(["-s", tmp_path / "missing"])
    assert r.returncode == 1 and "invalid spool directory" in r.stderr
