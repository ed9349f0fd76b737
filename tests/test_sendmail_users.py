"""emailrelay-sendmail for ordinary users, the daemon and the queue (-bp, -bs, -q).

The daemon runs as it is installed: started by root from a configuration
file with --user daemon and a 0770 spool owned by daemon. A user who
cannot write the spool hands the message to the daemon over SMTP.
"""

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile

import pytest

from helpers import BIN, Relay, env, free_port, spool_files, wait_for
from emailrelay.store.envelope import Envelope

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="su and a daemon-owned spool need root")


@pytest.fixture
def site():
    """A directory others may read (not root's private tmp) with a daemon-owned 0770 spool."""
    d = tempfile.mkdtemp(prefix="emailrelay-site-")
    os.chmod(d, 0o755)
    spool = os.path.join(d, "spool")
    os.mkdir(spool)
    daemon = pwd.getpwnam("daemon")
    os.chown(spool, daemon.pw_uid, daemon.pw_gid)
    os.chmod(spool, 0o770)
    yield d
    shutil.rmtree(d)


def write_config(site_dir, lines):
    conf = os.path.join(site_dir, "emailrelay.conf")
    with open(conf, "w") as f:
        f.write("\n".join(["spool-dir %s" % os.path.join(site_dir, "spool")] + lines) + "\n")
    os.chmod(conf, 0o644)
    return conf


def daemon(tmp_path, conf):
    """The relay started by root from `conf` only (no --domain: its default)."""
    relay = Relay(tmp_path, name="a", start=False, user=None)
    relay.args = [conf, "--no-daemon", "--log", "--verbose", "--no-syslog",
                  "--log-file", relay.log_path]
    relay.spool = os.path.join(os.path.dirname(conf), "spool")
    with open(conf) as f:
        relay._listeners = 1 + int("\nadmin " in f.read())
    return relay.start()


def greeting_domain(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(1000).decode().split()[1]


def user_env(conf):
    e = env()
    e["PATH"] = os.pathsep.join([BIN, "/usr/bin", "/bin"])
    e["EMAILRELAY_CONF"] = conf
    return e


def as_nobody(command, conf, **kwargs):
    return subprocess.run(["su", "-s", "/bin/sh", "nobody", "-c", command], env=user_env(conf),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=60, **kwargs)


def only_message(spool):
    [name] = spool_files(spool, ".envelope")
    env_ = Envelope.read(os.path.join(spool, name))
    with open(os.path.join(spool, name[:-len(".envelope")] + ".content"), "rb") as f:
        return env_, f.read().decode()


@needs_root
def test_an_ordinary_user_mails_root_through_the_running_daemon(tmp_path, site):
    port = free_port()
    with Relay(tmp_path, name="b") as b:
        conf = write_config(site, ["port %d" % port, "interface 127.0.0.1",
                                   "forward-to 127.0.0.1:%d" % b.port, "forward-on-disconnect"])
        with daemon(tmp_path, conf) as a:
            domain = greeting_domain(port)
            result = as_nobody('printf "To: root\\n\\nhi\\n" | emailrelay-sendmail -t -oi', conf)
            assert (result.returncode, result.stderr) == (0, "")
            wait_for(lambda: spool_files(b.spool, ".envelope"), timeout=30, what="the forwarded message")
            env_, content = only_message(b.spool)
            assert a.files(".envelope") == [] or wait_for(lambda: not a.files(".envelope"))
    assert env_.to_remote == ["root@%s" % domain]
    assert env_.from_ == "nobody@%s" % domain
    assert "\r\nTo: root\r\nFrom: nobody@%s\r\n" % domain in content
    assert re.search(r"\r\nMessage-ID: <[^>]+@%s>\r\n" % re.escape(domain), content)
    assert content.endswith("\r\n\r\nhi\r\n")


@needs_root
def test_without_a_daemon_the_user_is_told_why_and_nothing_is_lost_silently(site):
    conf = write_config(site, ["port %d" % free_port(), "interface 127.0.0.1"])
    result = as_nobody('printf "To: root\\n\\nhi\\n" | emailrelay-sendmail -t -oi', conf)
    assert result.returncode == 75
    assert re.fullmatch(r"emailrelay-sendmail: error: cannot reach the emailrelay daemon at "
                        r"127\.0\.0\.1:\d+: Connection refused \(this user cannot write the spool "
                        r"\S+, so the message goes to the running daemon\)\n", result.stderr)


def root_sendmail(args, conf, text="", program=None, **kwargs):
    command = [os.path.join(BIN, "emailrelay-sendmail")] + list(args)
    if program is not None:
        link = os.path.join(os.path.dirname(conf), program)
        if not os.path.exists(link):
            os.symlink(command[0], link)
        command[0] = link
    return subprocess.run(command, input=text, env=user_env(conf), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60, **kwargs)


def test_help_is_not_a_usage_error(site):
    conf = write_config(site, [])
    result = root_sendmail(["--help"], conf)
    assert result.returncode == 0 and result.stderr == ""
    for text in ("usage: emailrelay-sendmail", "-bp", "-bs", "-q", "-C file"):
        assert text in result.stdout


@needs_root
def test_bp_and_mailq_list_the_queue_for_root_and_through_the_admin_port(tmp_path, site):
    conf = write_config(site, ["port %d" % free_port(), "interface 127.0.0.1", "domain relay.test",
                               "admin %d" % free_port()])
    assert root_sendmail(["-bp"], conf).stdout == "Mail queue is empty\n"
    stored = root_sendmail(["-f", "me", "root", "ops@y.test"], conf, "Subject: queued\n\nhi\n")
    assert stored.returncode == 0, stored.stderr
    [name] = spool_files(os.path.join(site, "spool"), ".envelope")
    expected = ("%s ready size=\\d+ from=<me@relay.test> to=<root@relay.test>,<ops@y.test>\n"
                % re.escape(name[:-len(".envelope")]))
    assert re.fullmatch(expected, root_sendmail(["-bp"], conf).stdout)
    assert re.fullmatch(expected, root_sendmail([], conf, program="mailq").stdout)
    with daemon(tmp_path, conf):
        # nobody cannot read the spool: the daemon's admin port lists it.
        result = as_nobody(os.path.join(site, "mailq"), conf)
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(expected, result.stdout)


def test_bp_without_a_readable_spool_or_admin_port_says_why(site):
    conf = write_config(site, [])
    os.chmod(os.path.join(site, "spool"), 0o700)
    result = subprocess.run(["su", "-s", "/bin/sh", "nobody", "-c", "emailrelay-sendmail -bp"],
                            env=user_env(conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60) if os.geteuid() == 0 else None
    if result is None:
        pytest.skip("needs root for su")
    assert result.returncode == 77
    assert "cannot read the spool %s/spool" % site in result.stderr


@needs_root
def test_bs_speaks_smtp_with_the_daemon_for_an_ordinary_user(tmp_path, site):
    port = free_port()
    conf = write_config(site, ["port %d" % port, "interface 127.0.0.1", "domain relay.test"])
    dialogue = ("EHLO client.test\r\nMAIL FROM:<nobody@relay.test>\r\nRCPT TO:<b@y.test>\r\n"
                "DATA\r\n")
    with daemon(tmp_path, conf) as a:
        result = as_nobody("emailrelay-sendmail -bs", conf,
                           input=dialogue + "Subject: bs\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: a.files(".envelope"), what="the message in the spool")
    replies = [line[:3] for line in result.stdout.splitlines() if line[3:4] == " "]
    assert replies == ["220", "250", "250", "250", "354", "250", "221"]
    env_, content = only_message(os.path.join(site, "spool"))
    assert env_.to_remote == ["b@y.test"] and content.endswith("Subject: bs\r\n\r\nhello\r\n")


@needs_root
def test_bs_as_root_with_no_daemon_stores_the_message_itself(site):
    conf = write_config(site, ["port %d" % free_port(), "interface 127.0.0.1", "domain relay.test"])
    result = root_sendmail(["-bs"], conf, "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
                                          "DATA\r\nSubject: local\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("220 relay.test ") and "\n221 " in result.stdout
    env_, content = only_message(os.path.join(site, "spool"))
    assert env_.to_remote == ["b@y.test"] and "Subject: local" in content


@needs_root
def test_q_makes_the_daemon_forward_for_an_ordinary_user_and_root_forwards_itself(tmp_path, site):
    port = free_port()
    with Relay(tmp_path, name="b") as b:
        conf = write_config(site, ["port %d" % port, "interface 127.0.0.1", "domain relay.test",
                                   "forward-to 127.0.0.1:%d" % b.port])
        assert root_sendmail(["root"], conf, "Subject: one\n\nx\n").returncode == 0
        with daemon(tmp_path, conf):
            result = as_nobody("emailrelay-sendmail -q", conf)
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith("250 ")
            wait_for(lambda: len(b.files(".envelope")) == 1, timeout=30, what="the flushed message")
        # No daemon now: root's -q forwards the spool as --as-client would.
        assert root_sendmail(["root"], conf, "Subject: two\n\nx\n").returncode == 0
        result = root_sendmail(["-q"], conf)
        assert result.returncode == 0, result.stderr
        assert "forwarding the spool itself" in result.stdout
        assert len(b.files(".envelope")) == 2
    assert spool_files(os.path.join(site, "spool"), ".envelope") == []


@needs_root
def test_submit_as_an_ordinary_user_names_the_way_that_works(site):
    result = subprocess.run(
        ["su", "-s", "/bin/sh", "nobody", "-c",
         "printf 'x\\n' | emailrelay-submit --spool-dir %s/spool root@y.test" % site],
        env=user_env(os.devnull), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("emailrelay-submit: error: Permission denied: ")
    assert result.stderr.endswith(" (only root or the spool's group may write it: other users can "
                                  "send with emailrelay-sendmail, which hands the message to the "
                                  "running daemon)\n")


@needs_root
def test_through_the_daemon_dots_survive_and_bcc_is_a_recipient_not_a_header(tmp_path, site):
    port = free_port()
    conf = write_config(site, ["port %d" % port, "interface 127.0.0.1", "domain relay.test"])
    text = ("From: Me <me@x.test>\nTo: a@y.test\nBcc: hidden@y.test\nSubject: dots\n\n"
            "one\n.\n..two\n.three\nlast\n")
    with daemon(tmp_path, conf) as a:
        result = as_nobody("emailrelay-sendmail -t -oi", conf, input=text)
        assert (result.returncode, result.stderr) == (0, "")
        wait_for(lambda: a.files(".envelope"), what="the message in the spool")
    env_, content = only_message(os.path.join(site, "spool"))
    assert env_.from_ == "me@x.test"
    assert env_.to_remote == ["a@y.test", "hidden@y.test"]
    assert "Bcc" not in content and "hidden" not in content
    assert content.endswith("\r\n\r\none\r\n.\r\n..two\r\n.three\r\nlast\r\n")


def test_a_missing_spool_is_named_not_a_daemon(tmp_path):
    conf = tmp_path / "emailrelay.conf"
    conf.write_text("spool-dir %s\nport %d\n" % (tmp_path / "nospool", free_port()))
    result = root_sendmail(["root"], str(conf), "x\n")
    assert result.returncode == 73
    assert result.stderr == "emailrelay-sendmail: error: spool directory does not exist: %s\n" \
        % (tmp_path / "nospool")
