"""The SMTP client: content encoding, pipelining, MAIL parameters, outcomes.

Most tests send real spool messages with `smtp_client.Client` to a next
hop: Postfix's smtp-sink where it is enough, and `ScriptedServer` (below)
where the test must see the exact bytes on the wire or make the next hop
advertise or refuse particular things.
"""

import os
import socket
import subprocess
import threading

import pytest

import helpers
from emailrelay.auth import sasl, secrets
from emailrelay.config import options
from emailrelay.forward import smtp_client
from emailrelay.store import spool as spool_mod
from emailrelay.store.envelope import Envelope


# -- a next hop that records the raw dialogue ---------------------------------

class ScriptedServer:
    """A minimal SMTP server on a free port that records what it receives.

    `extensions`: EHLO keywords to advertise; `reject`: {address: reply}
    for RCPT (may be changed while it runs); `port`: 0 for a free one; `mail_reply`/`data_reply`:
    replies to MAIL and end-of-data.
    `sessions` holds one dict per connection with `commands` (lines),
    `data` (raw bytes between 354 and the terminator, still dot-stuffed;
    `messages` has every one of the session)
    and `bdat` (the concatenated BDAT chunks). It speaks just enough SMTP
    for the client under test.
    """

    def __init__(self, extensions=("PIPELINING", "8BITMIME", "SIZE 1000000"), reject=None,
                 mail_reply=b"250 2.1.0 ok", data_reply=b"250 2.0.0 queued", greeting=True,
                 tls=None, implicit=False, port=0):
        self.extensions = list(extensions)
        self.tls = tls
        self.implicit = implicit
        if tls is not None and not implicit:
            self.extensions.append("STARTTLS")
        self.reject = dict(reject or {})
        self.mail_reply = mail_reply
        self.data_reply = data_reply
        self.greeting = greeting
        self.sessions = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        record = {"commands": [], "data": b"", "bdat": b"", "tls": False, "error": None, "messages": []}
        self.sessions.append(record)
        if self.implicit:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError as e:
                record["error"] = e
                conn.close()
                return
            record["tls"] = True
        f = conn.makefile("rb")
        out = conn.makefile("wb")

        def reply(text):
            out.write(text + b"\r\n")
            out.flush()
        try:
            if self.greeting:
                reply(b"220 scripted ready")
            while True:
                line = f.readline()
                if not line:
                    return
                cmd = line.rstrip(b"\r\n").decode("utf-8", "replace")
                record["commands"].append(cmd)
                verb = cmd.split(" ")[0].upper()
                if verb == "EHLO":
                    lines = ["scripted"] + self.extensions
                    reply(b"\r\n".join(("250-" if i < len(lines) - 1 else "250 ").encode() + x.encode()
                                       for i, x in enumerate(lines)))
                elif verb == "MAIL":
                    reply(self.mail_reply)
                elif verb == "RCPT":
                    address = cmd[cmd.index("<") + 1:cmd.index(">")]
                    reply(self.reject.get(address, b"250 2.1.5 ok"))
                elif verb == "DATA":
                    reply(b"354 go ahead")
                    data = b""
                    while not data.endswith(b"\r\n.\r\n") and data != b".\r\n":
                        chunk = f.readline()
                        if not chunk:
                            return
                        data += chunk
                    record["data"] = data
                    record["messages"].append(data)
                    reply(self.data_reply)
                elif verb == "BDAT":
                    size = int(cmd.split()[1])
                    record["bdat"] += f.read(size)
                    reply(self.data_reply if cmd.upper().endswith("LAST") else b"250 2.0.0 chunk ok")
                elif verb == "STARTTLS":
                    reply(b"220 go ahead")
                    try:
                        conn = self.tls.wrap_socket(conn, server_side=True)
                    except OSError as e:
                        record["error"] = e
                        return
                    record["tls"] = True
                    f = conn.makefile("rb")
                    out = conn.makefile("wb")
                elif verb == "AUTH":
                    reply(b"235 2.7.0 authenticated")
                elif verb == "QUIT":
                    reply(b"221 bye")
                    return
                else:
                    reply(b"250 ok")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture
def scripted():
    servers = []

    def make(**kwargs):
        s = ScriptedServer(**kwargs)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


def dumping_sink(port, directory, count=100, extra=()):
    """smtp-sink writing one file per message into `directory` (a real next hop).

    Runs as root (`-u root`) so it can write into pytest's private temp dirs.
    """
    args = ["smtp-sink"] + (["-u", "root"] if os.geteuid() == 0 else [])
    proc = subprocess.Popen(args + list(extra) + ["-d", str(directory) + "/m.",
                                                  "127.0.0.1:%d" % port, str(count)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    helpers.wait_port(port)
    return proc


def sink_dumps(directory):
    """The contents of the files smtp-sink dumped, in no particular order."""
    out = []
    for name in os.listdir(str(directory)):
        with open(os.path.join(str(directory), name), "rb") as f:
            out.append(f.read())
    return out


def make_cfg(tmp_path, port, *extra):
    return options.parse(["--forward-to", "127.0.0.1:%d" % port, "--spool-dir", str(tmp_path),
                          "--domain", "client.test"] + list(extra))


def put_message(directory, data, to=("b@y.test",), from_="a@x.test", **fields):
    """Stores a committed message (content bytes `data`) in the spool; returns its id."""
    sp = spool_mod.Spool(str(directory))
    nm = sp.new_message()
    nm.write(data)
    nm.commit_content()
    return nm.finish(Envelope(from_=from_, to_remote=list(to), **fields))


def claim_one(directory, message_id):
    claim = spool_mod.Spool(str(directory)).claim(message_id)
    assert claim is not None
    return claim


# -- a session against real and scripted next hops ----------------------------

def test_message_to_smtp_sink_arrives_and_counts(tmp_path):
    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()
    port = helpers.free_port()
    sink = dumping_sink(port, sink_dir)
    try:
        ids = [put_message(tmp_path, b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i)) for i in range(3)]
        client = smtp_client.Client(make_cfg(tmp_path, port))
        for mid in ids:
            outcome = client.send(claim_one(tmp_path, mid))
            assert outcome.ok, outcome
        client.quit()
        helpers.wait_for(lambda: len(os.listdir(str(sink_dir))) == 3, what="3 dumps")
        bodies = sorted(sink_dumps(sink_dir))
        assert all(b"X-Rcpt-Args: <b@y.test>" in b for b in bodies)
        assert [b.count(b"body ") for b in bodies] == [1, 1, 1]
    finally:
        helpers.stop_process(sink)


def test_pipelined_transaction_and_mail_parameters(tmp_path, scripted):
    server = scripted(extensions=["PIPELINING", "8BITMIME", "SIZE 100000", "AUTH PLAIN"])
    mid = put_message(tmp_path, b"Subject: x\r\n\r\n\xe9t\xe9\r\n", to=["b@y.test", "c@y.test"],
                      content="8bit")
    client = smtp_client.Client(make_cfg(tmp_path, server.port))
    outcome = client.send(claim_one(tmp_path, mid))
    client.quit()
    assert outcome.ok and outcome.code == 250
    commands = server.sessions[0]["commands"]
    assert commands[0] == "EHLO client.test"
    size = len(b"Subject: x\r\n\r\n\xe9t\xe9\r\n")
    assert commands[1] == "MAIL FROM:<a@x.test> SIZE=%d BODY=8BITMIME" % size
    assert commands[2:5] == ["RCPT TO:<b@y.test>", "RCPT TO:<c@y.test>", "DATA"]
    assert server.sessions[0]["data"] == b"Subject: x\r\n\r\n\xe9t\xe9\r\n.\r\n"


def test_bare_cr_and_lf_reach_the_next_hop_as_crlf(tmp_path, scripted):
    server = scripted()
    mid = put_message(tmp_path, b"Subject: s\n\nline1\rline2\nline3\r\n.hidden\n")
    client = smtp_client.Client(make_cfg(tmp_path, server.port))
    assert client.send(claim_one(tmp_path, mid)).ok
    client.quit()
    data = server.sessions[0]["data"]
    assert data == b"Subject: s\r\n\r\nline1\r\nline2\r\nline3\r\n..hidden\r\n.\r\n"
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")


def send_all(client, directory, ids):
    """Sends each message (claimed, then released back to the queue) and quits."""
    for mid in ids:
        claim = claim_one(directory, mid)
        assert client.send(claim).ok
        claim.release()
    client.quit()


def test_auth_param_rules(tmp_path, scripted):
    """AUTH= only in a session we authenticated, as E-MailRelay 2.6."""
    server = scripted(extensions=["AUTH PLAIN"])
    ids = [put_message(tmp_path, b"x\r\n", mail_from_auth_out=value)
           for value in ("", "+", "alice+40x.test", "bad value")]
    send_all(smtp_client.Client(make_cfg(tmp_path, server.port)), tmp_path, ids)
    mails = [c for c in server.sessions[0]["commands"] if c.startswith("MAIL")]
    assert mails == ["MAIL FROM:<a@x.test>"] * 4
    secret = secrets.Secret("plain", "carol smith", password="pw")
    for extra, expected in [((), ["AUTH=carol+20smith", "AUTH=<>", "AUTH=alice+40x.test", "AUTH=<>"]),
                            (("--anonymous",), ["AUTH=<>"] * 4)]:
        client = smtp_client.Client(make_cfg(tmp_path, server.port, *extra),
                                    client_auth=sasl.ClientAuth(secret, "m:plain"))
        send_all(client, tmp_path, ids)
        mails = [c for c in server.sessions[-1]["commands"] if c.startswith("MAIL")]
        assert mails == ["MAIL FROM:<a@x.test> " + e for e in expected]


def test_no_auth_param_when_the_server_has_no_auth(tmp_path, scripted):
    server = scripted(extensions=["PIPELINING"])
    mid = put_message(tmp_path, b"x\r\n")
    client = smtp_client.Client(make_cfg(tmp_path, server.port))
    assert client.send(claim_one(tmp_path, mid)).ok
    client.quit()
    assert "MAIL FROM:<a@x.test>" in server.sessions[0]["commands"]


def test_binarymime_goes_by_bdat_with_exact_bytes(tmp_path, scripted):
    server = scripted(extensions=["PIPELINING", "CHUNKING", "BINARYMIME"])
    content = b"Subject: bin\r\n\r\n\x00\x01\r.\n\r\n.\r\n" * 3
    mid = put_message(tmp_path, content, content="binarymime")
    client = smtp_client.Client(make_cfg(tmp_path, server.port))
    assert client.send(claim_one(tmp_path, mid)).ok
    client.quit()
    s = server.sessions[0]
    assert "DATA" not in s["commands"]
    assert any(c.startswith("MAIL") and "BODY=BINARYMIME" in c for c in s["commands"])
    assert s["bdat"] == content


@pytest.mark.parametrize("fields, words, config", [
    ({"content": "binarymime"}, "BINARYMIME", "binarymimestrict"),
    ({"content": "8bit"}, "8BITMIME", "+eightbitstrict"),
    ({"utf8_mailbox_names": True}, "SMTPUTF8", "smtputf8strict"),
])
def test_a_message_needing_a_missing_extension_fails_when_strict(tmp_path, scripted, fields,
                                                                 words, config):
    server = scripted(extensions=["PIPELINING"])
    mid = put_message(tmp_path, b"x\r\n", **fields)
    client = smtp_client.Client(make_cfg(tmp_path, server.port, "--client-smtp-config", config))
    outcome = client.send(claim_one(tmp_path, mid))
    client.quit()
    assert not outcome.ok and words in outcome.reason
    assert not any(c.startswith("MAIL") for c in server.sessions[0]["commands"])


@pytest.mark.parametrize("fields, config", [
    ({"content": "binarymime"}, "nobinarymimestrict"),
    ({"content": "8bit"}, ""),
    ({"utf8_mailbox_names": True}, "-smtputf8strict"),
])
def test_a_message_needing_a_missing_extension_goes_plain_when_not_strict(tmp_path, scripted,
                                                                          fields, config):
    # E-MailRelay's defaults: 8-bit text goes without BODY=8BITMIME to a
    # server that lacks it; the other two need their keyword turned off.
    server = scripted(extensions=["PIPELINING"])
    mid = put_message(tmp_path, b"x\r\n", **fields)
    client = smtp_client.Client(make_cfg(tmp_path, server.port, "--client-smtp-config", config))
    outcome = client.send(claim_one(tmp_path, mid))
    client.quit()
    assert outcome.ok
    [mail] = [c for c in server.sessions[0]["commands"] if c.startswith("MAIL")]
    assert mail == "MAIL FROM:<a@x.test>"
    assert "DATA" in server.sessions[0]["commands"]


@pytest.mark.parametrize("config, pipelined", [("+pipelining", True), ("nopipelining", False)])
def test_client_pipelining_keyword(tmp_path, scripted, config, pipelined):
    # A refused MAIL shows it: pipelined, RCPT and DATA were already on their way.
    server = scripted(extensions=["PIPELINING"], mail_reply=b"451 4.3.0 not now")
    mid = put_message(tmp_path, b"x\r\n")
    client = smtp_client.Client(make_cfg(tmp_path, server.port, "-c", config))
    assert not client.send(claim_one(tmp_path, mid)).ok
    client.quit()
    assert ("RCPT TO:<b@y.test>" in server.sessions[0]["commands"]) == pipelined


def test_smtputf8_parameter_when_offered(tmp_path, scripted):
    server = scripted(extensions=["SMTPUTF8", "8BITMIME"])
    mid = put_message(tmp_path, b"x\r\n", from_="j\u00f6rg@x.test", utf8_mailbox_names=True)
    client = smtp_client.Client(make_cfg(tmp_path, server.port))
    assert client.send(claim_one(tmp_path, mid)).ok
    client.quit()
    assert "MAIL FROM:<j\u00f6rg@x.test> SMTPUTF8" in server.sessions[0]["commands"]


def test_rejected_recipient_fails_the_message_and_drops_the_data(tmp_path, scripted):
    server = scripted(reject={"bad@y.test": b"550 5.1.1 no such user"})
    bad = put_message(tmp_path, b"x\r\n", to=["b@y.test", "bad@y.test"])
    good = put_message(tmp_path, b"y\r\n")
    client = smtp_client.Client(make_cfg(tmp_path, server.port))
    outcome = client.send(claim_one(tmp_path, bad))
    assert not outcome.ok and outcome.code == 550
    assert "bad@y.test" in outcome.reason and "no such user" in outcome.reason
    # DATA had been accepted: the client dropped that connection and makes a
    # new one for the next message; the refused message never completed.
    assert client.send(claim_one(tmp_path, good)).ok
    client.quit()
    assert len(server.sessions) == 2
    assert server.sessions[0]["data"] == b""
    assert server.sessions[1]["data"] == b"y\r\n.\r\n"


def test_forward_to_some_sends_to_the_accepted(tmp_path, scripted):
    server = scripted(reject={"bad@y.test": b"450 4.2.0 mailbox busy"})
    mid = put_message(tmp_path, b"x\r\n", to=["b@y.test", "bad@y.test"])
    client = smtp_client.Client(make_cfg(tmp_path, server.port, "--forward-to-some"))
    outcome = client.send(claim_one(tmp_path, mid))
    client.quit()
    assert outcome.ok
    assert outcome.rejected == [("bad@y.test", "450 4.2.0 mailbox busy")]
    assert server.sessions[0]["data"] == b"x\r\n.\r\n"


def test_message_refused_at_end_of_data(tmp_path, scripted):
    server = scripted(data_reply=b"554 5.7.1 content rejected")
    mid = put_message(tmp_path, b"x\r\n")
    client = smtp_client.Client(make_cfg(tmp_path, server.port))
    outcome = client.send(claim_one(tmp_path, mid))
    client.quit()
    assert (outcome.ok, outcome.code, outcome.reason) == (False, 554, "554 5.7.1 content rejected")


def test_421_is_a_connection_failure(tmp_path, scripted):
    server = scripted(mail_reply=b"421 4.3.2 shutting down")
    mid = put_message(tmp_path, b"x\r\n")
    client = smtp_client.Client(make_cfg(tmp_path, server.port))
    with pytest.raises(smtp_client.ConnectionFailure, match="421"):
        client.send(claim_one(tmp_path, mid))


def test_unreachable_next_hop_is_a_connection_failure(tmp_path):
    port = helpers.free_port()
    client = smtp_client.Client(make_cfg(tmp_path, port))
    with pytest.raises(smtp_client.ConnectionFailure, match="cannot connect to 127.0.0.1:%d" % port):
        client.connect()


def test_prompt_timeout_goes_ahead_without_a_greeting(tmp_path, scripted):
    server = scripted(greeting=False)
    mid = put_message(tmp_path, b"x\r\n")
    client = smtp_client.Client(make_cfg(tmp_path, server.port, "--prompt-timeout", "1"))
    assert client.send(claim_one(tmp_path, mid)).ok
    client.quit()
    assert server.sessions[0]["commands"][0] == "EHLO client.test"


def test_response_timeout(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        cfg = make_cfg(tmp_path, silent.getsockname()[1], "--response-timeout", "1")
        with pytest.raises(smtp_client.ConnectionFailure, match="timed out"):
            smtp_client.Client(cfg).connect()
    finally:
        silent.close()


def test_client_interface_binds_the_local_address(tmp_path, scripted):
    server = scripted()
    seen = []
    orig = server._session

    def session(conn):
        seen.append(conn.getpeername()[0])
        orig(conn)
    server._session = session
    mid = put_message(tmp_path, b"x\r\n")
    client = smtp_client.Client(make_cfg(tmp_path, server.port, "--client-interface", "127.0.0.2"))
    assert client.send(claim_one(tmp_path, mid)).ok
    client.quit()
    assert seen == ["127.0.0.2"]


def test_client_interface_wildcard_picks_the_address_family(tmp_path, scripted):
    # localhost has only an IPv4 address here: "::" finds nothing to use.
    server = scripted()
    mid = put_message(tmp_path, b"x\r\n")
    base = ["--forward-to", "localhost:%d" % server.port, "--spool-dir", str(tmp_path)]
    client = smtp_client.Client(options.parse(base + ["--client-interface", "0.0.0.0"]))
    assert client.send(claim_one(tmp_path, mid)).ok
    client.quit()
    v6 = smtp_client.Client(options.parse(base + ["--client-interface", "::"]))
    with pytest.raises(smtp_client.ConnectionFailure, match='dns error: no such host: "localhost"'):
        v6.connect()
