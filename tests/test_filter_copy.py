"""bin/emailrelay-filter-copy: envelope copies for --pop-by-name users."""

import os
import subprocess

import helpers
from emailrelay.store.envelope import Envelope
from emailrelay.store.spool import Spool

FILTER_COPY = os.path.join(helpers.BIN, "emailrelay-filter-copy")


def filter_copy(args):
    # Filters run with an almost empty environment: PATH is all they get.
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": helpers.ROOT}
    return subprocess.run([FILTER_COPY] + [str(a) for a in args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=30)


def new_message(spool):
    """A message as the server holds it while filters run (envelope still .new)."""
    m = spool.new_message()
    m.write(b"Subject: x\r\n\r\nhello\r\n")
    m.commit_content()
    m.write_envelope(Envelope(from_="a@b", to_remote=["c@d"], client="127.0.0.1:5"))
    return m


def test_copies_into_every_user_directory_and_removes_the_main_envelope(tmp_path):
    for user in ("alice", "bob"):
        (tmp_path / user).mkdir()
    os.symlink(str(tmp_path / "alice"), str(tmp_path / "link"))
    s = Spool(str(tmp_path))
    m = new_message(s)
    expected = open(m.new_envelope_path, "rb").read()
    r = filter_copy([m.content_path])
    assert r.returncode == 100, r.stdout
    assert not os.path.exists(m.new_envelope_path)
    for user in ("alice", "bob"):
        assert os.listdir(str(tmp_path / user)) == [m.id + ".envelope"]
        assert (tmp_path / user / (m.id + ".envelope")).read_bytes() == expected
        assert oct(os.stat(str(tmp_path / user / (m.id + ".envelope"))).st_mode & 0o777) == "0o660"
        [item] = s.committed(user)
        assert item.content_path == m.content_path
    m.abandon()


def test_no_delete_keeps_the_main_envelope(tmp_path):
    (tmp_path / "carol").mkdir()
    s = Spool(str(tmp_path))
    m = new_message(s)
    r = filter_copy(["--no-delete", m.content_path])
    assert r.returncode == 0, r.stdout
    assert os.path.exists(m.new_envelope_path)
    assert os.listdir(str(tmp_path / "carol")) == [m.id + ".envelope"]
    m.finish(Envelope(from_="a@b", to_remote=["c@d"]))
    # Forwarding the main copy keeps the content for the POP user.
    s.claim(m.id).delete()
    assert os.path.exists(m.content_path)


def test_spool_mode_copies_committed_messages(tmp_path):
    (tmp_path / "dave").mkdir()
    s = Spool(str(tmp_path))
    m = new_message(s)
    m.finish(Envelope(from_="a@b", to_remote=["c@d"]))
    r = filter_copy(["-d", tmp_path])
    assert r.returncode == 0, r.stdout
    assert s.ids() == [] and s.committed("dave")[0].id == m.id


def test_errors_give_a_reason_line(tmp_path):
    s = Spool(str(tmp_path))
    m = new_message(s)
    r = filter_copy([m.content_path])
    assert r.returncode == 1 and r.stdout.startswith("<<no sub-directories to copy into")
    assert os.path.exists(m.new_envelope_path)
    r = filter_copy([tmp_path / "emailrelay.1.2.3.content"])
    assert r.returncode == 1 and r.stdout.startswith("<<no such file")
    r = filter_copy([])
    assert r.returncode == 1 and r.stdout.startswith("<<usage error")
    m.abandon()


def test_help():
    r = filter_copy(["--help"])
    assert r.returncode == 0 and "--no-delete" in r.stdout and "100" in r.stdout


def test_as_the_servers_filter(tmp_path):
    import smtplib
    spool_dir = tmp_path / "spool"
    for user in ("alice", "bob"):
        (spool_dir / user).mkdir(parents=True)
    with helpers.Relay(tmp_path, ["--filter", FILTER_COPY], spool=str(spool_dir)) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.net"], b"Subject: copy me\r\n\r\nhello\r\n")
        [content] = relay.files(".content")
        mid = content[:-len(".content")]
        assert relay.files(".envelope") == []  # not forwarded by SMTP
        s = Spool(relay.spool)
        for user in ("alice", "bob"):
            [item] = s.committed(user)
            assert item.id == mid and item.content_path == os.path.join(relay.spool, content)
            assert Envelope.read(item.envelope_path).to_remote == ["b@example.net"]


def test_the_man_pages_pop_by_name_example_finds_the_filter_on_path(tmp_path, monkeypatch):
    """`--filter emailrelay-filter-copy`, a bare name, is looked up on PATH as a shell would."""
    import poplib
    import smtplib
    monkeypatch.setenv("PATH", helpers.BIN + os.pathsep + os.environ["PATH"])
    spool_dir = tmp_path / "spool"
    (spool_dir / "bob").mkdir(parents=True)
    auth = tmp_path / "pop.auth"
    auth.write_text("server plain bob secret\n")
    with helpers.Relay(tmp_path, ["--pop-by-name", "--pop-auth", str(auth),
                                  "--filter", "emailrelay-filter-copy"],
                       spool=str(spool_dir), pop=True) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@example.com", ["bob@example.net"], b"Subject: for bob\r\n\r\nhello\r\n")
        pop = poplib.POP3("127.0.0.1", relay.pop_port, timeout=10)
        try:
            pop.user("bob")
            pop.pass_("secret")
            assert pop.stat()[0] == 1
            assert b"Subject: for bob" in pop.retr(1)[1]
        finally:
            pop.quit()
