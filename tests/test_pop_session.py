"""The POP3 session state machine over a MemoryConnection and a real temp spool."""

import base64
import hashlib
import hmac
import os
import re
import subprocess
import sys

import pytest

from emailrelay.net import connection
from emailrelay.config import options
from emailrelay.server import pop_maildrop, pop_server
from emailrelay.auth import sasl, secrets
from emailrelay.store import spool
from memory_connection import MemoryConnection

ENVELOPE = (
    "X-MailRelay-Format: #2821.8\r\n"
    "X-MailRelay-Content: 7bit\r\n"
    "X-MailRelay-From: a@x.test\r\n"
    "X-MailRelay-ToCount: 1\r\n"
    "X-MailRelay-To-Remote: b@y.test\r\n"
    "X-MailRelay-Authentication: \r\n"
    "X-MailRelay-Client: 127.0.0.1:1234\r\n"
    "X-MailRelay-ClientCertificate: \r\n"
    "X-MailRelay-MailFromAuthIn: \r\n"
    "X-MailRelay-MailFromAuthOut: \r\n"
    "X-MailRelay-ForwardTo: \r\n"
    "X-MailRelay-ForwardToAddress: \r\n"
    "X-MailRelay-ClientAccountSelector: \r\n"
    "X-MailRelay-Utf8MailboxNames: 0\r\n"
    "X-MailRelay-End: 1\r\n"
).encode("ascii")

MSG1 = (b"Subject: one\r\nFrom: a@x.test\r\n\r\nbody line 1\r\n.leading dot\r\n"
        b"..two dots\r\nlast\r\n")
MSG2 = b"Subject: two\r\n\r\nhello\r\n"


def add_message(directory, seq, content, user_dirs=()):
    """Writes a committed message as the spool does; envelope copies go to user_dirs."""
    mid = "emailrelay.%d.1700000000.%d" % (os.getpid(), seq)
    with open(os.path.join(directory, mid + ".content"), "wb") as f:
        f.write(content)
    for d in [directory] + [os.path.join(directory, u) for u in user_dirs]:
        with open(os.path.join(d, mid + ".envelope"), "wb") as f:
            f.write(ENVELOPE)
    return mid


def Services(cfg, tls_context=None):
    return pop_server.PopServices(
        settings=pop_server.PopSettings.from_config(cfg), spool=spool.Spool(cfg.spool_dir),
        tls_context=tls_context,
        pop_auth=sasl.ServerAuth(secrets.Reloadable(cfg.pop_auth), cfg.server_auth_config))


@pytest.fixture
def box(tmp_path):
    """A spool with two messages and a POP secrets file."""
    d = tmp_path / "spool"
    d.mkdir()
    ids = [add_message(str(d), 1, MSG1), add_message(str(d), 2, MSG2)]
    auth = tmp_path / "pop.auth"
    auth.write_text("server plain alice secret\nserver plain bob s3cret\n")
    auth.chmod(0o600)
    return {"dir": str(d), "ids": ids, "auth": str(auth), "tmp": tmp_path}


def make_services(box, *extra, tls_context=None):
    cfg = options.parse(["--spool-dir", box["dir"], "--pop", "--pop-auth", box["auth"],
                         "--domain", "pop.test"] + list(extra))
    return Services(cfg, tls_context)


def session(services, *lines, peer=("127.0.0.1", 40000)):
    """Runs a whole session over the given command lines; returns the reply text."""
    data = b"".join(line if isinstance(line, bytes) else (line + "\r\n").encode() for line in lines)
    conn = MemoryConnection(data, peer=peer)
    pop_server.PopSession(conn, services).run()
    assert conn.closed
    return conn.output.decode("utf-8", "replace"), conn


def replies(text):
    return text.split("\r\n")


def test_greeting_has_domain_and_apop_banner(box):
    out, _ = session(make_services(box), "QUIT")
    first = replies(out)[0]
    assert re.match(r"^\+OK pop\.test POP3 server ready <\d+\.\d+\.\d+@pop\.test>$", first)
    assert replies(out)[1].startswith("+OK")


def test_banners_are_unique_per_session(box):
    s = make_services(box)
    a = replies(session(s, "QUIT")[0])[0]
    b = replies(session(s, "QUIT")[0])[0]
    assert a != b


def test_user_pass_stat_list_uidl_and_quit_keeps_everything(box):
    out, _ = session(make_services(box), "USER alice", "PASS secret", "STAT", "LIST",
                     "LIST 2", "UIDL", "UIDL 1", "NOOP", "QUIT")
    r = replies(out)
    total = len(MSG1) + len(MSG2)
    assert r[1] == "+OK send PASS"
    assert r[2] == "+OK maildrop has 2 messages (%d octets)" % total
    assert r[3] == "+OK 2 %d" % total
    assert r[4].startswith("+OK 2 messages")
    assert r[5:8] == ["1 %d" % len(MSG1), "2 %d" % len(MSG2), "."]
    assert r[8] == "+OK 2 %d" % len(MSG2)
    assert r[9].startswith("+OK")
    assert r[10:13] == ["1 %s" % box["ids"][0], "2 %s" % box["ids"][1], "."]
    assert r[13] == "+OK 1 %s" % box["ids"][0]
    assert r[14] == "+OK"
    assert r[15].startswith("+OK pop.test POP3 server signing off")
    assert len(os.listdir(box["dir"])) == 5  # 2 envelopes, 2 contents, the lock file


def test_retr_is_dot_stuffed_and_terminated(box):
    out, _ = session(make_services(box), "USER alice", "PASS secret", "RETR 1", "QUIT")
    body = out.split("\r\n", 3)[3]
    assert body.startswith("+OK %d octets\r\n" % len(MSG1))
    sent = body.split("\r\n", 1)[1]
    assert sent.startswith("Subject: one\r\nFrom: a@x.test\r\n\r\nbody line 1\r\n"
                           "..leading dot\r\n...two dots\r\nlast\r\n.\r\n")


def test_top_sends_header_and_n_body_lines(box):
    out, _ = session(make_services(box), "USER alice", "PASS secret", "TOP 1 0", "TOP 1 2",
                     "TOP 1", "TOP 9 1", "QUIT")
    assert ("+OK top of message follows\r\nSubject: one\r\nFrom: a@x.test\r\n\r\n.\r\n"
            "+OK top of message follows\r\nSubject: one\r\nFrom: a@x.test\r\n\r\n"
            "body line 1\r\n..leading dot\r\n.\r\n"
            "-ERR usage: TOP message lines\r\n-ERR no such message\r\n") in out


def test_bare_lf_content_is_sent_with_crlf_and_final_line_ending(box):
    add_message(box["dir"], 3, b"Subject: lf\n\n.x\nno final newline")
    out, _ = session(make_services(box), "USER alice", "PASS secret", "RETR 3", "QUIT")
    assert "Subject: lf\r\n\r\n..x\r\nno final newline\r\n.\r\n+OK" in out


def test_dele_then_quit_deletes_envelope_and_content(box):
    out, _ = session(make_services(box), "USER alice", "PASS secret", "DELE 1", "DELE 1",
                     "STAT", "LIST 1", "RETR 1", "QUIT")
    r = replies(out)
    assert r[3] == "+OK message 1 deleted"
    assert r[4] == "-ERR no such message"
    assert r[5] == "+OK 1 %d" % len(MSG2)
    assert r[6] == r[7] == "-ERR no such message"
    assert r[8].startswith("+OK") and "1 messages left" in r[8]
    left = sorted(n for n in os.listdir(box["dir"]) if n.startswith("emailrelay."))
    assert left == [box["ids"][1] + ".content", box["ids"][1] + ".envelope"]


def test_dropped_connection_deletes_nothing(box):
    out, _ = session(make_services(box), "USER alice", "PASS secret", "DELE 1", "DELE 2")
    assert out.count("deleted") == 2
    assert len([n for n in os.listdir(box["dir"]) if n.startswith("emailrelay.")]) == 4


def test_rset_undeletes(box):
    out, _ = session(make_services(box), "USER alice", "PASS secret", "DELE 1", "RSET",
                     "STAT", "QUIT")
    assert "+OK 2 %d\r\n" % (len(MSG1) + len(MSG2)) in out
    assert len([n for n in os.listdir(box["dir"]) if n.startswith("emailrelay.")]) == 4


def test_pop_no_delete_says_ok_but_keeps_files(box):
    out, _ = session(make_services(box, "--pop-no-delete"), "USER alice", "PASS secret",
                     "DELE 1", "STAT", "QUIT")
    assert "+OK message 1 deleted\r\n+OK 1 %d\r\n" % len(MSG2) in out
    assert len([n for n in os.listdir(box["dir"]) if n.startswith("emailrelay.")]) == 4


def test_wrong_password_keeps_session_then_three_failures_close(box):
    s = make_services(box)
    out, _ = session(s, "USER alice", "PASS wrong", "USER alice", "PASS secret", "STAT", "QUIT")
    r = replies(out)
    assert r[2] == "-ERR [AUTH] authentication failed"
    assert r[4].startswith("+OK maildrop has 2")
    out, _ = session(s, "USER alice", "PASS x", "USER nobody", "PASS x", "APOP alice 00",
                     "USER alice", "PASS secret")
    r = replies(out)
    assert r[-2] == "-ERR [AUTH] authentication failed, closing connection"
    assert "maildrop has" not in out


def test_pass_without_user_and_bad_commands_keep_session(box):
    out, _ = session(make_services(box), "PASS secret", "STAT", "FOO", "", "LIST",
                     b"X" * 2000 + b"\r\n", "USER alice", "PASS secret", "RETR", "RETR x",
                     "DELE 0", "LIST 99", "STLS", "USER bob", "QUIT")
    r = replies(out)
    assert r[1] == "-ERR give USER first"
    assert r[2] == "-ERR STAT is not valid in this state"
    assert r[3] == r[4] == "-ERR unknown command"
    assert r[5] == "-ERR LIST is not valid in this state"
    assert r[6] == "-ERR line too long"
    assert r[8].startswith("+OK maildrop has 2")
    assert r[9] == r[10] == "-ERR need a message number"
    assert r[11] == r[12] == "-ERR no such message"
    assert r[13] == "-ERR STLS is not valid in this state"
    assert r[14] == "-ERR USER is not valid in this state"
    assert r[15].startswith("+OK")


def test_too_many_bad_commands_close_the_session(box):
    s = make_services(box, "--max-bad-commands", "2")
    out, _ = session(s, "FOO", "BAR", "BAZ", "USER alice", "PASS secret")
    r = replies(out)
    assert r[1] == r[2] == "-ERR unknown command"
    assert r[3] == "-ERR too many bad commands, closing connection"
    assert "+OK send PASS" not in out


def test_apop_with_plain_secret(box):
    s = make_services(box)
    conn = MemoryConnection(b"")
    sess = pop_server.PopSession(conn, s)
    digest = hashlib.md5((sess.banner + "secret").encode()).hexdigest()
    conn._chunks = [("APOP alice %s\r\nAPOP alice \u00e9\r\nAPOP alice %s\r\nSTAT\r\nQUIT\r\n"
                     % ("0" * 32, digest)).encode()]
    sess.run()
    r = replies(conn.output.decode())
    assert r[0].endswith(sess.banner)
    assert r[1] == r[2] == "-ERR [AUTH] authentication failed"
    assert r[3].startswith("+OK maildrop has 2")
    assert r[4].startswith("+OK 2 ")


def test_auth_plain_login_and_cram_md5(box):
    s = make_services(box)
    plain = base64.b64encode(b"\0alice\0secret").decode()
    out, _ = session(s, "AUTH PLAIN " + plain, "STAT", "QUIT")
    assert "+OK maildrop has 2" in out

    out, _ = session(s, "AUTH PLAIN", plain, "QUIT")
    assert replies(out)[1] == "+ " and "+OK maildrop has 2" in out

    out, _ = session(s, "AUTH LOGIN", base64.b64encode(b"bob").decode(),
                     base64.b64encode(b"s3cret").decode(), "QUIT")
    r = replies(out)
    assert r[1].startswith("+ ") and r[2].startswith("+ ")
    assert r[3].startswith("+OK maildrop has 2")

    class Responder(MemoryConnection):
        def _recv(self):
            m = re.search(rb"\+ (\S+)\r\n", self.output)
            if m and not self.answered:
                self.answered = True
                challenge = base64.b64decode(m.group(1))
                mac = hmac.new(b"secret", challenge, hashlib.md5).hexdigest()
                return base64.b64encode(b"alice " + mac.encode()) + b"\r\nQUIT\r\n"
            return super()._recv()

    conn = Responder(b"AUTH CRAM-MD5\r\n")
    conn.answered = False
    pop_server.PopSession(conn, s).run()
    assert "+OK maildrop has 2" in conn.output.decode()


def test_auth_cancel_bad_base64_unknown_mechanism_and_listing(box):
    out, _ = session(make_services(box), "AUTH LOGIN", "*", "AUTH PLAIN !!!", "AUTH FOO",
                     "AUTH", "QUIT")
    r = replies(out)
    assert r[1].startswith("+ ") and r[2] == "-ERR authentication cancelled"
    assert r[3] == "-ERR [AUTH] authentication failed"
    assert r[4] == "-ERR unsupported authentication mechanism"
    assert r[5] == "+OK"
    assert "PLAIN" in r[6:r.index(".")]


def test_capa_before_and_after_login(box):
    out, _ = session(make_services(box), "CAPA", "USER alice", "PASS secret", "CAPA", "QUIT")
    before = out.split("\r\n.\r\n")[0]
    for cap in ("TOP", "UIDL", "USER", "RESP-CODES", "PIPELINING", "IMPLEMENTATION"):
        assert "\r\n%s" % cap in before
    assert re.search(r"\r\nSASL [A-Z0-9 -]*PLAIN", before)
    assert "STLS" not in before  # no TLS context
    after = out.split("\r\n.\r\n")[1]
    assert "\r\nTOP\r\n" in after and "USER" not in after and "SASL" not in after


class FakeTls:
    """Stands in for an ssl.SSLContext: only passed through to starttls()."""


class TlsMemoryConnection(MemoryConnection):
    """A memory connection whose STLS succeeds, discarding pipelined input."""

    def starttls(self, context):
        assert isinstance(context, FakeTls)
        self.output += b"<TLS>"
        self._buf.clear()
        self.tls = True


def test_stls_discards_pipelined_input_and_tls_required(box):
    s = make_services(box, "--server-tls-required", "--server-tls",
                      "--server-tls-certificate", "/dev/null", tls_context=FakeTls())
    conn = TlsMemoryConnection([b"CAPA\r\nUSER alice\r\n", b"STLS\r\nUSER alice\r\n",
                                b"CAPA\r\nSTLS\r\nUSER alice\r\nPASS secret\r\nQUIT\r\n"])
    pop_server.PopSession(conn, s).run()
    before, after = conn.output.decode().split("<TLS>")
    assert "\r\nSTLS\r\n" in before and "\r\nUSER\r\n" not in before and "SASL" not in before
    assert "-ERR TLS is required: use STLS first" in before
    assert before.endswith("+OK begin TLS negotiation\r\n")
    r = replies(after)
    # The USER pipelined behind STLS is gone: the first reply is CAPA's.
    assert r[0] == "+OK capability list follows"
    capa = r[:r.index(".")]
    assert "USER" in capa and "STLS" not in capa
    assert r[len(capa) + 1] == "-ERR TLS is already active"
    assert r[len(capa) + 3].startswith("+OK maildrop has 2")


def test_idle_timeout_default_is_rfc_minimum_and_explicit_wins(box):
    _, conn = session(make_services(box), "QUIT")
    assert conn.timeout == 600
    _, conn = session(make_services(box, "--idle-timeout", "5"), "QUIT")
    assert conn.timeout == 5


class TimeoutConnection(MemoryConnection):
    def _recv(self):
        if self._chunks:
            return super()._recv()
        raise connection.Timeout()


def test_idle_timeout_closes_without_update(box):
    conn = TimeoutConnection([b"USER alice\r\nPASS secret\r\nDELE 1\r\n"])
    pop_server.PopSession(conn, make_services(box)).run()
    assert conn.output.decode().endswith("-ERR idle timeout, closing connection\r\n")
    assert len([n for n in os.listdir(box["dir"]) if n.startswith("emailrelay.")]) == 4


def test_lock_in_process(box):
    s = make_services(box)
    holder = pop_maildrop.Maildrop(s.spool, box["dir"], False)
    try:
        out, _ = session(s, "USER alice", "PASS secret", "USER bob", "PASS s3cret", "QUIT")
        assert out.count("-ERR [IN-USE] maildrop locked") == 2
    finally:
        holder.close()
    out, _ = session(s, "USER alice", "PASS secret", "QUIT")
    assert "+OK maildrop has 2" in out


def test_lock_across_processes(box):
    code = ("import fcntl,os,sys; fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT); "
            "fcntl.flock(fd,fcntl.LOCK_EX); print('locked',flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, os.path.join(box["dir"], pop_maildrop.LOCK_FILE)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"locked\n"
        out, _ = session(make_services(box), "USER alice", "PASS secret", "QUIT")
        assert "-ERR [IN-USE] maildrop locked" in out
    finally:
        p.stdin.close()
        p.wait(10)
    out, _ = session(make_services(box), "USER alice", "PASS secret", "QUIT")
    assert "+OK maildrop has 2" in out


@pytest.fixture
def byname(box):
    """alice and bob each have a sub-directory with envelope copies; content is shared."""
    for user in ("alice", "bob"):
        os.mkdir(os.path.join(box["dir"], user))
    box["shared"] = add_message(box["dir"], 7, b"Subject: shared\r\n\r\nx\r\n", ["alice", "bob"])
    return box


def test_by_name_each_user_sees_own_copy_and_shared_content_survives(byname):
    s = make_services(byname, "--pop-by-name")
    out, _ = session(s, "USER alice", "PASS secret", "UIDL", "DELE 1", "QUIT")
    assert "+OK maildrop has 1 messages" in out and "1 %s\r\n" % byname["shared"] in out
    content = os.path.join(byname["dir"], byname["shared"] + ".content")
    assert os.path.exists(content)
    assert not os.path.exists(os.path.join(byname["dir"], "alice", byname["shared"] + ".envelope"))
    out, _ = session(s, "USER bob", "PASS s3cret", "RETR 1", "DELE 1", "QUIT")
    assert "Subject: shared\r\n\r\nx\r\n.\r\n" in out
    # The main spool's own envelope still refers to the content.
    assert os.path.exists(content)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc", "..\\x", "a\x00b", "a\x01b",
                                  "a b", "\x7f", ".hidden", "x" * 256])
def test_unsafe_names_never_reach_the_file_system(name):
    assert not pop_maildrop.valid_user_name(name)
    with pytest.raises(pop_maildrop.MaildropError):
        pop_maildrop.maildrop_directory("/nonexistent-spool", name, True)


@pytest.mark.parametrize("name", ["..", "../spool", "a/b", "/etc", "sub\\..", "x\x01y", "-"])
def test_by_name_session_refuses_unsafe_or_missing_names(byname, name):
    """Secrets may hold any name; with --pop-by-name only safe, existing ones log in."""
    with open(byname["auth"], "a") as f:
        f.write("server plain %s pw\n" % _xtext(name))
    s = make_services(byname, "--pop-by-name")
    before = sorted(os.listdir(str(byname["tmp"])))
    out, _ = session(s, "USER " + name, "PASS pw", "STAT", "QUIT")
    r = replies(out)
    assert r[2].startswith("-ERR ["), r
    assert r[3] == "-ERR STAT is not valid in this state"
    assert sorted(os.listdir(str(byname["tmp"]))) == before


def test_by_name_refuses_symlink_out_of_spool(byname, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    add_message(str(outside), 9, MSG2)
    os.rename(os.path.join(byname["dir"], "bob"), str(tmp_path / "bob-old"))
    os.symlink(str(outside), os.path.join(byname["dir"], "bob"))
    out, _ = session(make_services(byname, "--pop-by-name"), "USER bob", "PASS s3cret", "QUIT")
    assert "-ERR [SYS/PERM] maildrop is outside the spool directory" in out
    assert not os.path.exists(str(outside / pop_maildrop.LOCK_FILE))


def _xtext(text):
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else "+%02X" % ord(c)
                   for c in text)


def test_command_table_follows_rfc_1939_states():
    by_state = {}
    for verb, row in pop_server.COMMANDS.items():
        assert callable(row.handler) and row.verb == verb
        states = row.states
        for state in states:
            by_state.setdefault(state, set()).add(verb)
    assert by_state[pop_server.AUTHORIZATION] == {"CAPA", "STLS", "USER", "PASS", "APOP", "AUTH",
                                                  "QUIT"}
    assert by_state[pop_server.TRANSACTION] == {"CAPA", "STAT", "LIST", "UIDL", "RETR", "TOP",
                                                "DELE", "NOOP", "RSET", "QUIT"}
    assert pop_server.UPDATE not in by_state, "UPDATE takes no commands: QUIT ends it"
