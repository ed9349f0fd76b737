"""bin/emailrelay-submit: messages put straight into the spool."""

import os
import socket
import subprocess
import sys

import helpers
from emailrelay.store.envelope import Envelope
from emailrelay.store.spool import Spool
from emailrelay.tools.submit import CHUNK

SUBMIT = os.path.join(helpers.BIN, "emailrelay-submit")


def submit(args, data=b"", **kwargs):
    return subprocess.run([sys.executable, SUBMIT] + [str(a) for a in args], input=data, env=helpers.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30, **kwargs)


def only_message(spool_dir):
    [mid] = Spool(str(spool_dir)).ids()
    content = (spool_dir / (mid + ".content")).read_bytes()
    env = Envelope.read(str(spool_dir / (mid + ".envelope")))
    return mid, content, env


def headers_of(content):
    head = content.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")]


def test_submit_from_stdin(tmp_path):
    msg = b"From: Joe <joe@example.com>\nSubject: hello\n\nline one\nline two\n"
    r = submit(["--spool-dir", tmp_path, "--verbose", "you@example.net", "\\other@example.net"], msg)
    assert r.returncode == 0, r.stderr
    mid, content, env = only_message(tmp_path)
    assert r.stdout.decode().strip() == str(tmp_path / (mid + ".content"))
    assert content.startswith(b"From: Joe <joe@example.com>\r\nSubject: hello\r\n")
    assert content.endswith(b"\r\n\r\nline one\r\nline two\r\n")
    assert b"\n" not in content.replace(b"\r\n", b"")
    assert headers_of(content) == [b"from", b"subject", b"date", b"message-id"]
    fqdn = socket.getfqdn().encode()
    assert [x for x in content.split(b"\r\n") if x.startswith(b"Message-ID:")][0].endswith(b"@" + fqdn + b">")
    assert env.from_ == "joe@example.com"
    assert env.to_remote == ["you@example.net", "other@example.net"] and env.to_local == []
    assert env.client == "127.0.0.1"
    assert env.content == "7bit"
    assert oct(os.stat(str(tmp_path / (mid + ".content"))).st_mode & 0o777) == "0o660"


def test_existing_date_and_message_id_are_kept(tmp_path):
    msg = (b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n"
           b"From: a@b\r\n\r\nbody\r\n")
    assert submit(["-s", tmp_path, "-f", "env@from", "c@d"], msg).returncode == 0
    _, content, env = only_message(tmp_path)
    assert content == msg
    assert env.from_ == "env@from"


def test_input_file_8bit_and_dot_line(tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    f = tmp_path / "msg"
    f.write_bytes(b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n.\r\nnot part of it\r\n")
    r = submit(["--input-file", f, "--spool-dir", spool_dir, "--from", "s@x", "r@y"], b"ignored stdin")
    assert r.returncode == 0, r.stderr
    _, content, env = only_message(spool_dir)
    assert content.endswith(b"\r\n\r\nbody\r\n")
    assert b"not part" not in content and b"ignored" not in content
    assert env.content == "8bit"


def test_body_without_headers_gets_a_header_section(tmp_path):
    assert submit(["-s", tmp_path, "a@b"], b"just some text\nmore").returncode == 0
    _, content, env = only_message(tmp_path)
    assert headers_of(content) == [b"date", b"message-id"]
    assert content.endswith(b"\r\n\r\njust some text\r\nmore\r\n")
    assert env.from_ == "anonymous"


def test_content_from_to_and_message_id_domain(tmp_path):
    msg = b"From: old@x\r\nSender: s@x\r\nTo: t@x\r\n\tcontinued@x\r\nSubject: s\r\n\r\nb\r\n"
    r = submit(["-s", tmp_path, "-f", "me@here", "-F", "-t", "-I", "id.example", "you@there",
                "--to", "third@there"], msg)
    assert r.returncode == 0, r.stderr
    _, content, env = only_message(tmp_path)
    head = content.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"Subject: s"
    assert b"From: me@here" in head and b"To: third@there, you@there" in head
    assert not [x for x in head if x.startswith((b"Sender", b"\t", b"To: t@x"))]
    assert [x for x in head if x.startswith(b"Message-ID:")][0].endswith(b"@id.example>")
    assert env.to_remote == ["third@there", "you@there"]


def test_long_lines_and_split_crlf(tmp_path):
    line = b"x" * (CHUNK - 1)
    data = b"Subject: long\n\n" + line + b"\r\n" + b"y" * (3 * CHUNK + 5) + b"\nend"
    assert submit(["-s", tmp_path, "a@b"], data).returncode == 0
    _, content, _ = only_message(tmp_path)
    body = content.split(b"\r\n\r\n", 1)[1]
    assert body == line + b"\r\n" + b"y" * (3 * CHUNK + 5) + b"\r\nend\r\n"


def test_copy_into_subdirectories(tmp_path):
    (tmp_path / "alice").mkdir()
    (tmp_path / "bob").mkdir()
    r = submit(["-s", tmp_path, "--copy", "-n", "a@b"], b"Subject: x\n\nhi\n")
    assert r.returncode == 0, r.stderr
    name = r.stdout.decode().strip()
    mid = name[:-len(".content")]
    assert sorted(os.listdir(str(tmp_path))) == ["alice", "bob", name]
    for user in ("alice", "bob"):
        assert os.listdir(str(tmp_path / user)) == [mid + ".envelope"]
        assert Spool(str(tmp_path)).committed(user)[0].content_path == str(tmp_path / name)


def test_failures_leave_nothing_behind(tmp_path):
    r = submit(["-s", tmp_path / "missing", "a@b"], b"x\n")
    assert r.returncode == 1 and b"spool directory" in r.stderr
    r = submit(["-s", tmp_path], b"Subject: x\n\nno recipients\n")
    assert r.returncode == 1 and b"no recipient" in r.stderr
    r = submit(["-s", tmp_path, "-x", tmp_path / "no-such-file", "a@b"])
    assert r.returncode == 1 and b"no-such-file" in r.stderr
    r = submit(["-s", tmp_path, "-x", tmp_path, "a@b"])  # a directory is no input file
    assert r.returncode == 1
    r = submit(["-s", tmp_path, "a@b\r\nX-MailRelay-To-Remote: evil@x"], b"x\n")
    assert r.returncode == 1
    assert os.listdir(str(tmp_path)) == []


def test_read_only_spool_fails_cleanly(tmp_path):
    if os.geteuid() == 0:
        # root ignores the permission bits; use an unwritable file system path instead
        r = submit(["-s", "/proc", "a@b"], b"x\n")
    else:
        os.chmod(str(tmp_path), 0o500)
        r = submit(["-s", tmp_path, "a@b"], b"x\n")
        os.chmod(str(tmp_path), 0o700)
    assert r.returncode == 1 and r.stderr.startswith(b"emailrelay-submit: error:")
    assert os.listdir(str(tmp_path)) == []


def test_help_names_the_options():
    r = submit(["--help"])
    assert r.returncode == 0
    for option in (b"--from", b"--spool-dir", b"--input-file", b"--verbose", b"<to-address>"):
        assert option in r.stdout


def test_submitted_message_is_forwarded(tmp_path):
    spool_dir = tmp_path / "outgoing"
    spool_dir.mkdir()
    msg = b"From: joe@example.com\nSubject: via submit\n\nhello\n"
    assert submit(["-s", spool_dir, "dest@example.net"], msg).returncode == 0
    _, content, _ = only_message(spool_dir)
    with helpers.Relay(tmp_path, name="nexthop") as nexthop:
        r = helpers.run_emailrelay(["--as-client", "127.0.0.1:%d" % nexthop.port,
                                    "--spool-dir", str(spool_dir)])
        assert r.returncode == 0, r.stderr
        assert os.listdir(str(spool_dir)) == []
        [mid] = Spool(nexthop.spool).ids()
        env = Envelope.read(os.path.join(nexthop.spool, mid + ".envelope"))
        assert env.from_ == "joe@example.com" and env.to_remote == ["dest@example.net"]
        with open(os.path.join(nexthop.spool, mid + ".content"), "rb") as f:
            assert f.read().endswith(content)
