"""The POP3 server end to end: the real program with real POP clients.

poplib, curl pop3:// and fetchmail (keep and delete, plain and STLS), the
SMTP store -> emailrelay-filter-copy -> --pop-by-name flow, locking, the
UPDATE state and the STLS injection guard.
"""

import os
import poplib
import smtplib
import socket
import ssl
import subprocess

import pytest

from helpers import BIN, Relay, wait_for

MESSAGE = "Subject: test %d\r\nFrom: a@x.test\r\n\r\nbody %d\r\n.dot line\r\n"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed key and certificate in one PEM file."""
    path = str(tmp_path_factory.mktemp("cert") / "server.pem")
    subprocess.run(["openssl", "req", "-x509", "-nodes", "-subj", "/CN=localhost", "-days", "2",
                    "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", path, "-out", path], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def auth_file(tmp_path):
    path = tmp_path / "pop.auth"
    path.write_text("server plain alice secret\nserver plain bob s3cret\n")
    path.chmod(0o600)
    return str(path)


def relay(tmp_path, *args):
    return Relay(tmp_path, ["--pop-auth", auth_file(tmp_path)] + list(args), pop=True)


def submit(r, count):
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        for i in range(1, count + 1):
            s.sendmail("a@x.test", ["b@y.test"], (MESSAGE % (i, i)).encode())


def pop(r, user="alice", password="secret"):
    p = poplib.POP3("127.0.0.1", r.pop_port, timeout=10)
    p.user(user)
    p.pass_(password)
    return p


def committed(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".envelope"))


def test_poplib_full_session(tmp_path):
    with relay(tmp_path) as r:
        submit(r, 2)
        p = pop(r)
        count, size = p.stat()
        assert count == 2
        _, listing, _ = p.list()
        sizes = [int(line.split()[1]) for line in listing]
        assert sum(sizes) == size
        _, uids, _ = p.uidl()
        ids = [u.split()[1].decode() for u in uids]
        assert [i + ".envelope" for i in ids] == committed(r.spool)
        _, lines, octets = p.retr(1)
        # poplib undoes dot-stuffing; the size counts CRLFs as the content file does.
        assert lines[-2:] == [b"body 1", b".dot line"]
        assert octets - 2 * len(lines) <= sizes[0] <= octets
        _, top, _ = p.top(2, 0)
        assert b"Subject: test 2" in top and top[-1] == b"" and b"body 2" not in top
        p.dele(1)
        p.quit()
        assert committed(r.spool) == [ids[1] + ".envelope"]
        assert not os.path.exists(os.path.join(r.spool, ids[0] + ".content"))
        # UIDs and sizes are the same in the next session.
        p = pop(r)
        assert p.uidl(1).split()[2].decode() == ids[1]
        assert int(p.list(1).split()[2]) == sizes[1]
        p.quit()
        r.wait_log(r"pop: alice logged in")


def test_wrong_password_and_bad_command_keep_the_session(tmp_path):
    with relay(tmp_path) as r:
        p = poplib.POP3("127.0.0.1", r.pop_port, timeout=10)
        p.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            p.pass_("wrong")
        with pytest.raises(poplib.error_proto, match="unknown command"):
            p._shortcmd("XYZZY")
        p.user("alice")
        p.pass_("secret")
        assert p.stat() == (0, 0)
        p.quit()
        r.wait_log(r"authentication failed \(USER/PASS\) for alice")


def test_curl_list_retrieve_delete(tmp_path):
    with relay(tmp_path) as r:
        submit(r, 2)
        url = "pop3://127.0.0.1:%d/" % r.pop_port
        base = ["curl", "-s", "-S", "--max-time", "10", "--user", "alice:secret"]
        listing = subprocess.run(base + [url], stdout=subprocess.PIPE, check=True).stdout
        assert [line.split()[0] for line in listing.splitlines()] == [b"1", b"2"]
        got = subprocess.run(base + [url + "2"], stdout=subprocess.PIPE, check=True).stdout
        assert b"Subject: test 2\r\n" in got and b"\r\n.dot line\r\n" in got
        subprocess.run(base + ["-X", "DELE 1", "-I", url], stdout=subprocess.PIPE, check=True)
        listing = subprocess.run(base + [url], stdout=subprocess.PIPE, check=True).stdout
        assert [line.split()[0] for line in listing.splitlines()] == [b"1"]
        assert len(committed(r.spool)) == 1


def fetchmail(tmp_path, port, keep, tls):
    """Runs fetchmail once into an mbox file; returns (exit status, mbox text)."""
    home = tmp_path / "fetchmail-home"
    home.mkdir(exist_ok=True)
    out = home / "out.mbox"
    ssl_opts = "sslproto 'tls1.2+' no sslcertck" if tls else "sslproto ''"
    rc = home / "fetchmailrc"
    rc.write_text("set no bouncemail\n"
                  "poll 127.0.0.1 with proto POP3 port %d\n"
                  "  user \"alice\" password \"secret\" %s %s\n"
                  "  mda \"/bin/sh -c 'cat >> %s'\"\n"
                  % (port, ssl_opts, "keep" if keep else "nokeep fetchall", out))
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home))
    # As root, fetchmail locks /var/run/fetchmail.pid unless told otherwise.
    proc = subprocess.run(["fetchmail", "-f", str(rc), "-v", "--nodetach",
                           "--pidfile", str(home / "fetchmail.pid")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    text = out.read_text() if out.exists() else ""
    return proc.returncode, text, proc.stdout.decode("utf-8", "replace")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "stls"])
def test_fetchmail_keep_then_delete(tmp_path, certificate, tls):
    extra = ["--server-tls", "--server-tls-certificate", certificate] if tls else []
    with relay(tmp_path, *extra) as r:
        submit(r, 2)
        status, mbox, out = fetchmail(tmp_path, r.pop_port, keep=True, tls=tls)
        assert status == 0, out
        assert mbox.count("Subject: test") == 2 and "\n.dot line\n" in mbox
        assert len(committed(r.spool)) == 2
        if tls:
            assert "STLS" in out and r.log().count("pop: tls established") == 1
        # Stable UIDs: fetchmail's UIDL bookkeeping finds nothing new.
        status, mbox, out = fetchmail(tmp_path, r.pop_port, keep=True, tls=tls)
        assert status == 1 and "2 messages (2 seen)" in out, out
        status, mbox, out = fetchmail(tmp_path, r.pop_port, keep=False, tls=tls)
        assert status == 0, out
        assert mbox.count("Subject: test") == 4
        assert committed(r.spool) == []
        assert [n for n in os.listdir(r.spool) if n.endswith(".content")] == []


def test_server_tls_required_refuses_login_before_stls(tmp_path, certificate):
    with relay(tmp_path, "--server-tls", "--server-tls-certificate", certificate,
               "--server-tls-required") as r:
        p = poplib.POP3("127.0.0.1", r.pop_port, timeout=10)
        assert "USER" not in p.capa() and "STLS" in p.capa()
        with pytest.raises(poplib.error_proto, match="TLS is required"):
            p.user("alice")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        p.stls(ctx)
        assert "USER" in p.capa()
        p.user("alice")
        p.pass_("secret")
        p.quit()


def test_stls_discards_pipelined_commands(tmp_path, certificate):
    with relay(tmp_path, "--server-tls", "--server-tls-certificate", certificate) as r:
        s = socket.create_connection(("127.0.0.1", r.pop_port), timeout=10)
        f = s.makefile("rb")
        assert f.readline().startswith(b"+OK")
        s.sendall(b"STLS\r\nUSER alice\r\n")
        assert f.readline() == b"+OK begin TLS negotiation\r\n"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        t = ctx.wrap_socket(s)
        t.sendall(b"PASS secret\r\nQUIT\r\n")
        reply = t.makefile("rb").readline()
        # Had 'USER alice' survived the handshake, PASS would have logged in.
        assert reply == b"-ERR give USER first\r\n"
        t.close()


def test_second_login_to_a_maildrop_is_locked_out(tmp_path):
    with relay(tmp_path) as r:
        first = pop(r)
        second = poplib.POP3("127.0.0.1", r.pop_port, timeout=10)
        second.user("bob")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\] maildrop locked"):
            second.pass_("s3cret")
        first.quit()
        second.user("bob")
        second.pass_("s3cret")
        second.quit()


def test_dropped_connection_after_dele_deletes_nothing(tmp_path):
    with relay(tmp_path) as r:
        submit(r, 2)
        p = pop(r)
        p.dele(1)
        p.dele(2)
        p.close()  # no QUIT

        def login():
            try:
                return pop(r)
            except poplib.error_proto as e:
                assert "IN-USE" in str(e)  # the old session has not seen EOF yet
                return None
        p = wait_for(login, what="maildrop unlocked")
        assert p.stat()[0] == 2
        p.quit()
        assert len(committed(r.spool)) == 2


def test_pop_no_delete(tmp_path):
    with relay(tmp_path, "--pop-no-delete") as r:
        submit(r, 1)
        p = pop(r)
        assert p.dele(1).startswith(b"+OK")
        assert p.stat()[0] == 0
        p.quit()
        assert len(committed(r.spool)) == 1
        r.wait_log(r"1 messages kept \(--pop-no-delete\)")


def test_store_to_pop_two_users_with_filter_copy(tmp_path):
    spool = tmp_path / "relay" / "spool"
    for user in ("alice", "bob"):
        (spool / user).mkdir(parents=True)
    with relay(tmp_path, "--pop-by-name", "--filter",
               os.path.join(BIN, "emailrelay-filter-copy")) as r:
        submit(r, 2)
        contents = sorted(n for n in os.listdir(r.spool) if n.endswith(".content"))
        assert len(contents) == 2
        fetched = {}
        for user, password in (("alice", "secret"), ("bob", "s3cret")):
            p = pop(r, user, password)
            count, _ = p.stat()
            fetched[user] = sorted(b"\n".join(p.retr(i + 1)[1]) for i in range(count))
            if user == "alice":
                for i in range(count):
                    p.dele(i + 1)
            p.quit()
        assert len(fetched["alice"]) == 2 and fetched["alice"] == fetched["bob"]
        assert b"Subject: test 1" in fetched["alice"][0]
        assert committed(str(spool / "alice")) == []
        assert len(committed(str(spool / "bob"))) == 2
        # bob's copies still read their shared content.
        assert sorted(n for n in os.listdir(r.spool) if n.endswith(".content")) == contents
        p = pop(r, "bob", "s3cret")
        assert p.stat()[0] == 2 and b"body 2" in b"\n".join(p.retr(2)[1])
        p.quit()


def test_by_name_unknown_or_unsafe_users_are_refused(tmp_path):
    spool = tmp_path / "relay" / "spool"
    spool.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), str(spool / "bob"))
    with relay(tmp_path, "--pop-by-name") as r:
        with pytest.raises(poplib.error_proto, match=r"no maildrop for this user"):
            pop(r, "alice", "secret")
        with pytest.raises(poplib.error_proto, match=r"outside the spool"):
            pop(r, "bob", "s3cret")
        assert os.listdir(str(outside)) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace")
def test_the_user_guides_pop_only_recipe(tmp_path):
    # Seed 001: "emailrelay --pop --no-smtp --log --close-stderr", which
    # reads the POP accounts from /etc/emailrelay.auth. The file is put
    # there in a mount namespace of the test's own (an overlay on /etc),
    # so the host's /etc is never touched.
    from helpers import PYTHON, ROOT, env, free_port
    spool = tmp_path / "spool"
    spool.mkdir()
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    (upper / "emailrelay.auth").write_text("server plain alice secret\n")
    port = free_port()
    pid_file = tmp_path / "pid"
    log_file = tmp_path / "log"
    recipe = "emailrelay --pop --no-smtp --log --close-stderr"
    script = ("mount -t overlay overlay -o lowerdir=/etc,upperdir=%s,workdir=%s /etc && "
              "exec %s -m %s --pop-port %d --spool-dir %s --pid-file %s --log-file %s "
              "--interface 127.0.0.1" % (upper, work, PYTHON, recipe, port, spool, pid_file,
                                         log_file))
    started = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                             cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert started.returncode == 0, started.stdout
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), what="the pid file")
    pid = int(pid_file.read_text())
    try:
        wait_for(lambda: "pop server on" in log_file.read_text(), what="the POP server")
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("alice")
        assert pop.pass_("secret").startswith(b"+OK")
        assert pop.stat() == (0, 0)
        pop.quit()
    finally:
        os.kill(pid, 15)
        wait_for(lambda: not pid_file.exists(), what="the daemon to stop")
