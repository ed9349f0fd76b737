"""The SMTP server state machine over in-memory connections (no sockets).

Each test feeds a client's bytes to `SmtpSession` and asserts on the replies
and on the files in a real spool directory.
"""

import os
import types

import pytest

from emailrelay.store import envelope, spool, spool_message
from emailrelay.net import connection
from emailrelay.server import smtp_params, smtp_server, smtp_settings
from emailrelay.config import options
from emailrelay.util import smtp_controls, smtp_syntax
from emailrelay.util.stats import Stats
from memory_connection import MemoryConnection


def make_cfg(tmp_path, **kw):
    cfg = dict(domain="relay.test", anonymous=False, size=0, idle_timeout=60,
               max_bad_commands=5, server_tls_required=False, max_recipients=100,
               max_bounce_recipients=0, min_free_space=0, spool_dir=str(tmp_path),
               immediate=False, tarpit=None, helo_check=False, greeting=[], min_data_rate=500,
               # These tests look at the whole state machine, with our
               # enhanced status codes; test_smtp_compat.py checks the defaults.
               server_smtp_config=["+enhancedstatuscodes,+chunking,+smtputf8"])
    cfg.update(kw)
    given = set(kw.pop("given", ("max-bad-commands",)))
    cfg.pop("given", None)
    # What the option parser interprets once for the whole program.
    cfg.update(server_features=options.smtp_config(cfg["server_smtp_config"],
                                                   options.SERVER_SMTP_KEYWORDS),
               tarpit_steps=smtp_controls.parse_tarpit(cfg["tarpit"]) if cfg["tarpit"] else None,
               anonymous_scopes=frozenset(options.anonymous_scopes(cfg["anonymous"])))
    return types.SimpleNamespace(given=lambda name: name in given, **cfg)


def make_services(tmp_path, **kw):
    parts = dict(stats=Stats())
    names = smtp_server.SmtpServices.__slots__
    cfg_kw = {k: v for k, v in kw.items() if k not in names}
    parts.update({k: v for k, v in kw.items() if k in names})
    settings = smtp_settings.SmtpSettings.from_config(make_cfg(tmp_path, **cfg_kw))
    return smtp_server.SmtpServices(settings=settings, spool=spool.Spool(str(tmp_path)), **parts)


class CountingConnection(MemoryConnection):
    """Counts flushes that sent something, to see replies being batched."""

    def __init__(self, data, **kw):
        super().__init__(data, **kw)
        self.sends = 0
        self._unsent = 0

    def write(self, data):
        super().write(data)
        self._unsent += len(data)

    def flush(self):
        if self._unsent:
            self.sends += 1
            self._unsent = 0


def talk(tmp_path, data, conn_class=CountingConnection, **kw):
    services = kw.pop("services", None) or make_services(tmp_path, **kw)
    conn = conn_class(data)
    smtp_server.SmtpSession(conn, services).run()
    assert conn.closed
    return conn.output.decode("utf-8"), services, conn


def codes(output):
    """The reply codes, one per reply (continuation lines folded)."""
    out = []
    for line in output.split("\r\n"):
        if len(line) >= 4 and line[3] == " ":
            out.append(line[:3])
    return out


def stored(tmp_path):
    """[(content bytes, Envelope)] for every committed message."""
    out = []
    for name in sorted(os.listdir(str(tmp_path))):
        if name.endswith(".envelope"):
            base = os.path.join(str(tmp_path), name[:-len(".envelope")])
            with open(base + ".content", "rb") as f:
                out.append((f.read(), envelope.Envelope.read(base + ".envelope")))
    return out


def body_of(content):
    """The content without our Received line."""
    assert content.startswith(b"Received: from ")
    return content.split(b"\r\n", 1)[1]


ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"


def test_greeting_and_ehlo_keywords(tmp_path):
    out, _, _ = talk(tmp_path, b"EHLO client.test\r\nQUIT\r\n", size=1000)
    assert out.startswith("220 relay.test -- E-MailRelay V")
    for kw in ("PIPELINING", "SIZE 1000", "8BITMIME", "SMTPUTF8", "CHUNKING",
               "ENHANCEDSTATUSCODES", "VRFY"):
        assert "250-%s\r\n" % kw in out or "250 %s\r\n" % kw in out
    for absent in ("STARTTLS", "AUTH", "ETRN"):
        assert absent not in out
    assert codes(out) == ["220", "250", "221"]


def test_one_message_stored_with_received_line_and_envelope(tmp_path):
    data = ENVELOPE + b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n"
    out, services, _ = talk(tmp_path, data)
    assert codes(out) == ["220", "250", "250", "250", "354", "250", "221"]
    assert "250 2.0.0 message processed" in out
    [(content, env)] = stored(tmp_path)
    first, rest = content.split(b"\r\n", 1)
    assert first.startswith(b"Received: from client.test ([127.0.0.1]) by relay.test with ESMTP id emailrelay.")
    assert rest == b"Subject: hi\r\n\r\nhello\r\n"
    assert env.from_ == "a@x.test" and env.to_remote == ["b@y.test"] and env.to_local == []
    assert env.client == "127.0.0.1" and env.content == "7bit"
    assert env.authentication == "" and env.mail_from_auth_in == ""
    assert services.stats.snapshot()["messages-stored"] == 1


def test_pipelined_replies_are_sent_in_few_writes(tmp_path):
    data = ENVELOPE + b"x\r\n.\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\ny\r\n.\r\nQUIT\r\n"
    out, _, conn = talk(tmp_path, [data])
    assert codes(out) == ["220", "250", "250", "250", "354", "250", "250", "250", "354", "250", "221"]
    # greeting; EHLO..DATA; 250+MAIL+RCPT+354; 250+QUIT at close
    assert conn.sends <= 4
    assert len(stored(tmp_path)) == 2


def test_dot_unstuffing_and_terminator_across_every_chunk_boundary(tmp_path):
    text = b"..leading dot\r\n.\tx\r\nmid.dle\r\n...\r\n\r\n"
    data = ENVELOPE + text + b".\r\nQUIT\r\n"
    talk(tmp_path, [bytes([b]) for b in data])
    [(content, _)] = stored(tmp_path)
    assert body_of(content) == b".leading dot\r\n\tx\r\nmid.dle\r\n..\r\n\r\n"


def test_empty_message(tmp_path):
    out, _, _ = talk(tmp_path, ENVELOPE + b".\r\nQUIT\r\n")
    [(content, _)] = stored(tmp_path)
    assert body_of(content) == b""


@pytest.mark.parametrize("seq", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\r\n.\r",
                                 b"\r\n.\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"])
def test_smuggling_sequences_do_not_end_the_message(tmp_path, seq):
    smuggled = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nforged\r\n"
    data = ENVELOPE + b"start" + seq + smuggled + b".\r\nQUIT\r\n"
    out, _, _ = talk(tmp_path, data)
    assert codes(out) == ["220", "250", "250", "250", "354", "250", "221"]
    [(content, env)] = stored(tmp_path)
    assert env.from_ == "a@x.test"
    body = body_of(content)
    assert body.startswith(b"start") and b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>" in body
    assert body.endswith(b"forged\r\n")


def test_long_text_lines_are_accepted_intact(tmp_path):
    data = ENVELOPE + b"ok\r\n" + b"x" * 5000 + b"\r\n.more\r\n.\r\nQUIT\r\n"
    out, _, _ = talk(tmp_path, data)
    assert codes(out) == ["220", "250", "250", "250", "354", "250", "221"]
    [(content, _)] = stored(tmp_path)
    assert body_of(content) == b"ok\r\n" + b"x" * 5000 + b"\r\nmore\r\n"


def test_huge_line_is_streamed_not_buffered(tmp_path):
    # 8 MiB with no line ending, in blocks that split it anywhere: stored as sent.
    line = b"z" * 65536 * 128
    data = ([ENVELOPE] + [line[i:i + 7001] for i in range(0, len(line), 7001)]
            + [b"\r\n.\r\nQUIT\r\n"])
    out, _, _ = talk(tmp_path, data)
    assert codes(out)[-2:] == ["250", "221"]
    [(content, _)] = stored(tmp_path)
    assert body_of(content) == line + b"\r\n"


def test_command_line_limit(tmp_path):
    out, _, _ = talk(tmp_path, b"EHLO " + b"h" * 506 + b"\r\nNOOP " + b"n" * 500 + b"\r\nQUIT\r\n")
    assert codes(out) == ["220", "500", "250", "221"]
    assert "500 5.5.2 line too long" in out


def test_size_limit_at_mail_and_during_data(tmp_path):
    data = (b"EHLO c\r\nMAIL FROM:<a@x.test> SIZE=2000\r\nMAIL FROM:<a@x.test> SIZE=100\r\n"
            b"RCPT TO:<b@y.test>\r\nDATA\r\n" + b"0123456789\r\n" * 200 + b".\r\nQUIT\r\n")
    out, _, _ = talk(tmp_path, data, size=1000)
    assert codes(out) == ["220", "250", "552", "250", "250", "354", "552", "221"]
    assert "552 5.3.4" in out
    assert os.listdir(str(tmp_path)) == []


@pytest.mark.parametrize("data,expect", [
    (b"MAIL FROM:<a@x.test>\r\n", "503 5.5.1 command out of sequence -- use RSET to resynchronise"),
    (b"HELO c\r\nRCPT TO:<b@y.test>\r\n", "503 5.5.1 command out of sequence -- use RSET to resynchronise"),
    (b"HELO c\r\nMAIL FROM:<a@x.test>\r\nDATA\r\n", "554 5.5.1 no valid recipients"),
    (b"HELO c\r\nMAIL FROM:<a@x.test>\r\nMAIL FROM:<a@x.test>\r\n",
     "503 5.5.1 command out of sequence -- use RSET to resynchronise"),
    (b"HELO c\r\nMAIL TO:<a@x.test>\r\n", "553 5.5.2 mailbox name not allowed: invalid mail-from command"),
    (b"HELO c\r\nMAIL FROM:<a@x.test\r\n",
     "553 5.1.7 mailbox name not allowed: missing or invalid angle brackets in mailbox name"),
    (b"HELO c\r\nMAIL FROM:a@x.test\r\n",
     "553 5.1.7 mailbox name not allowed: missing or invalid angle brackets in mailbox name"),
    (b"HELO c\r\nMAIL FROM:<a@x.test> BODY=9BIT\r\n", "501 5.5.4 invalid argument"),
    (b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<>\r\n", "550 5.1.3 empty address"),
    (b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b\rc@y.test>\r\n",
     "550 5.1.3 invalid character in mailbox name"),
    (b"HELO\r\n", "501 5.5.4 parameter required"),
    (b"EXPN staff\r\n", "502 5.5.1 command not implemented"),
    (b"STARTTLS\r\n", "500 5.5.1 command unrecognized"),
    (b"AUTH PLAIN\r\n", "502 5.5.1 command not implemented"),
    (b"XYZZY\r\n", "500 5.5.1 command unrecognized"),
    (b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT x\r\n", "501 5.5.4 invalid argument"),
    (b"EHLO c\r\nMAIL FROM:<a@x.test> BODY=BINARYMIME\r\nRCPT TO:<b@y.test>\r\nDATA\r\n",
     "503 5.5.1 invalid data command with binarymime -- use RSET to resynchronise"),
])
def test_errors(tmp_path, data, expect):
    out, _, _ = talk(tmp_path, data + b"QUIT\r\n")
    assert "\r\n" + expect + "\r\n" in out
    assert out.endswith("221 2.0.0 OK\r\n")


def test_unknown_mail_parameters_are_ignored_as_emailrelay_does(tmp_path):
    out, _, _ = talk(tmp_path, b"EHLO c\r\nMAIL FROM:<a@x.test> RET=HDRS ENVID=x\r\n"
                     b"RCPT TO:<b@y.test> NOTIFY=NEVER\r\nQUIT\r\n")
    assert codes(out) == ["220", "250", "250", "250", "221"]


def test_too_many_bad_commands_closes(tmp_path):
    out, _, _ = talk(tmp_path, b"X1\r\nX2\r\nX3\r\nNOOP\r\nX4\r\nNOOP\r\n", max_bad_commands=3)
    assert codes(out) == ["220", "500", "500", "500", "250", "421"]
    assert out.endswith("421 4.7.0 relay.test too many errors, closing connection\r\n")


def test_max_recipients_and_bounce_recipients(tmp_path):
    rcpts = b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(4))
    out, _, _ = talk(tmp_path, b"HELO c\r\nMAIL FROM:<a@x.test>\r\n" + rcpts + b"RSET\r\n"
                     + b"MAIL FROM:<>\r\n" + rcpts + b"DATA\r\n.\r\nQUIT\r\n",
                     max_recipients=3, max_bounce_recipients=1)
    assert codes(out) == ["220", "250", "250", "250", "250", "250", "452", "250",
                          "250", "250", "452", "452", "452", "354", "250", "221"]
    assert "452 4.5.3 too many recipients\r\n" in out
    [(_, env)] = stored(tmp_path)
    assert env.from_ == "" and env.to_remote == ["r0@y.test"]


def test_min_free_space(tmp_path):
    out, _, _ = talk(tmp_path, b"HELO c\r\nMAIL FROM:<a@x.test>\r\nQUIT\r\n", min_free_space=10 ** 15)
    assert "452 4.3.1 insufficient system storage" in out


def test_body_smtputf8_and_auth_param_go_into_the_envelope(tmp_path):
    data = (b"EHLO c\r\nMAIL FROM:<j\xc3\xbcrgen@x.test> BODY=8BITMIME SMTPUTF8 SIZE=10\r\n"
            b"RCPT TO:<b@y.test>\r\nDATA\r\n\xe2\x82\xac\r\n.\r\nQUIT\r\n")
    out, _, _ = talk(tmp_path, data)
    [(content, env)] = stored(tmp_path)
    assert env.content == "8bit" and env.utf8_mailbox_names and env.from_ == "j\u00fcrgen@x.test"
    assert body_of(content) == "\u20ac\r\n".encode("utf-8")


def test_bdat_chunks_pipelined_without_unstuffing(tmp_path):
    data = (b"EHLO c\r\nMAIL FROM:<a@x.test> BODY=BINARYMIME\r\nRCPT TO:<b@y.test>\r\n"
            b"BDAT 7\r\n.\r\n\x00\n.\rBDAT 5 LAST\r\n\r\n.\r\nQUIT\r\n")
    out, _, _ = talk(tmp_path, [bytes([b]) for b in data])
    assert codes(out) == ["220", "250", "250", "250", "250", "250", "221"]
    assert "250 2.0.0 7 bytes received" in out
    [(content, env)] = stored(tmp_path)
    assert body_of(content) == b".\r\n\x00\n.\r\r\n.\r\n" and env.content == "binarymime"


def test_bdat_zero_last_and_sequence_errors_consume_the_chunk(tmp_path):
    data = (b"EHLO c\r\nBDAT 6\r\nQUIT\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
            b"BDAT 3\r\nabcDATA\r\nBDAT 0 LAST\r\nQUIT\r\n")
    out, _, _ = talk(tmp_path, data)
    assert codes(out) == ["220", "250", "503", "250", "250", "250", "503", "250", "221"]
    [(content, _)] = stored(tmp_path)
    assert body_of(content) == b"abc"


def test_bdat_too_big_and_rset_in_bdat(tmp_path):
    data = (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 20\r\n" + b"x" * 20
            + b"BDAT 1 LAST\r\nyMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 2\r\nzzRSET\r\nQUIT\r\n")
    out, _, _ = talk(tmp_path, data, size=10)
    assert codes(out) == ["220", "250", "250", "250", "552", "503", "250", "250", "250", "250", "221"]
    assert os.listdir(str(tmp_path)) == []


def test_help_vrfy_noop_rset(tmp_path):
    out, _, _ = talk(tmp_path, b"HELP\r\nHELP mail\r\nVRFY <b@y.test>\r\nNOOP\r\nRSET\r\nQUIT\r\n")
    assert "214 2.0.0 commands: BDAT DATA EHLO EXPN HELO HELP MAIL NOOP QUIT RCPT RSET VRFY\r\n" in out
    assert "214 2.0.0 Syntax: MAIL FROM:<address>" in out
    assert "252 2.1.5 cannot verify but will accept: b@y.test\r\n" in out
    assert codes(out) == ["220", "214", "214", "252", "250", "250", "221"]


def test_anonymous(tmp_path):
    verifier = FakeVerifier({})
    out, _, _ = talk(tmp_path, b"EHLO c\r\nVRFY b@y.test\r\n" + ENVELOPE.split(b"\r\n", 1)[1] + b"x\r\n.\r\nQUIT\r\n",
                     anonymous=True, verifier=verifier)
    assert out.startswith("220 relay.test -- Service ready\r\n")
    assert "VRFY" not in out.split("252")[0] and "252 2.1.5 cannot vrfy" in out
    assert [c[1] for c in verifier.calls] == ["a@x.test"]  # RCPT only, not VRFY
    [(content, _)] = stored(tmp_path)
    assert content == b"x\r\n"


class TimeoutConnection(CountingConnection):
    def _recv(self):
        data = super()._recv()
        if not data:
            raise connection.Timeout()
        return data


def test_idle_timeout_mid_data_leaves_nothing(tmp_path):
    out, _, _ = talk(tmp_path, ENVELOPE + b"partial\r\n", conn_class=TimeoutConnection)
    assert out.endswith("421 4.4.2 relay.test idle timeout\r\n")
    assert os.listdir(str(tmp_path)) == []


def test_eof_mid_data_leaves_nothing(tmp_path):
    talk(tmp_path, ENVELOPE + b"partial\r\n")
    assert os.listdir(str(tmp_path)) == []


class FakeVerifier:
    def __init__(self, table):
        self.table = table
        self.calls = []

    def verify(self, rcpt, from_, ip, domain, mech, name):
        self.calls.append((rcpt, from_, ip, domain, mech, name))
        status, text = self.table.get(rcpt, ("remote", ""))
        return types.SimpleNamespace(status=status, address=text if status == "local" else rcpt,
                                     full_name="Bob", reason=text)


def test_verifier_results(tmp_path):
    v = FakeVerifier({"loc@y.test": ("local", "postmaster"), "bad@y.test": ("reject", "no such user"),
                      "tmp@y.test": ("tempfail", "try later"), "kill@y.test": ("abort", "")})
    data = (b"HELO c\r\nVRFY loc@y.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<loc@y.test>\r\n"
            b"RCPT TO:<bad@y.test>\r\nRCPT TO:<tmp@y.test>\r\nRCPT TO:<rem@y.test>\r\nDATA\r\nx\r\n.\r\n"
            b"MAIL FROM:<a@x.test>\r\nRCPT TO:<kill@y.test>\r\nQUIT\r\n")
    out, _, _ = talk(tmp_path, data, verifier=v)
    assert codes(out) == ["220", "250", "250", "250", "250", "550", "450", "250", "354", "250", "250"]
    assert "250 2.1.5 Bob\r\n" in out
    assert "550 5.1.1 no such user" in out and "450 4.1.1 try later" in out
    assert v.calls[0] == ("loc@y.test", "", "127.0.0.1", "relay.test", "", "")
    assert v.calls[1] == ("loc@y.test", "a@x.test", "127.0.0.1", "relay.test", "", "")
    [(_, env)] = stored(tmp_path)
    assert env.to_local == ["postmaster"] and env.to_remote == ["rem@y.test"]


class FakeFilter:
    def __init__(self, ok=True, special=None, reason="", temporary=False, action=None):
        self.result = types.SimpleNamespace(ok=ok, special=special, reason=reason,
                                            temporary=temporary, code=None, response="error")
        self.action = action
        self.spec = "fake"
        self.seen = []

    def run(self, content_path, envelope_path):
        self.seen.append((content_path, envelope_path, os.path.exists(envelope_path)))
        if self.action:
            self.action(content_path, envelope_path)
        return self.result


@pytest.mark.parametrize("flt,reply,kept", [
    (FakeFilter(), "250 2.0.0 message processed", 1),
    (FakeFilter(ok=False, reason="spam detected"), "452 4.7.1 spam detected", 0),
    (FakeFilter(ok=False, reason="filter timed out", temporary=True), "452 4.3.0 error", 0),
    (FakeFilter(special="cancel", action=lambda c, e: (os.remove(c), os.remove(e))),
     "250 2.0.0 message processed\r\n", 0),
    (FakeFilter(action=lambda c, e: (os.remove(c), os.remove(e))), "452 4.3.0 rejected\r\n", 0),
])
def test_filter_outcomes(tmp_path, flt, reply, kept):
    out, services, _ = talk(tmp_path, ENVELOPE + b"x\r\n.\r\nQUIT\r\n", filters=[flt])
    assert reply in out
    assert flt.seen and flt.seen[0][1].endswith(".envelope.new") and flt.seen[0][2]
    assert len(stored(tmp_path)) == kept
    assert not [n for n in os.listdir(str(tmp_path)) if n.endswith(".new")]
    if not kept:
        assert os.listdir(str(tmp_path)) == []


def test_filter_rescan_triggers_forwarder_and_stop_skips_later_filters(tmp_path):
    fwd = types.SimpleNamespace(triggers=0)
    rescan = lambda: setattr(fwd, "triggers", fwd.triggers + 1)  # noqa: E731
    later = FakeFilter(ok=False, reason="never run")
    out, _, _ = talk(tmp_path, ENVELOPE + b"x\r\n.\r\nQUIT\r\n", rescan=rescan,
                     filters=[FakeFilter(special="rescan"), FakeFilter(special="stop"), later])
    assert "250 2.0.0 message processed" in out and fwd.triggers == 1 and not later.seen
    assert len(stored(tmp_path)) == 1


def test_etrn_only_with_forwarder(tmp_path):
    fwd = types.SimpleNamespace(triggers=0)
    trigger = lambda: setattr(fwd, "triggers", fwd.triggers + 1)  # noqa: E731
    out, _, _ = talk(tmp_path, b"EHLO c\r\nETRN relay.test\r\nQUIT\r\n", trigger=trigger)
    assert "250-ETRN\r\n" in out and "250 2.0.0 OK" in out and fwd.triggers == 1


def test_storage_failure_gives_452_and_no_traceback(tmp_path):
    services = make_services(tmp_path)

    class Broken:
        def new_message(self):
            raise OSError(28, "No space left on device")
    services.spool = Broken()
    out, _, _ = talk(tmp_path, ENVELOPE + b"x\r\n.\r\nQUIT\r\n", services=services)
    assert "452 4.3.1 insufficient system storage" in out
    assert "Traceback" not in out
    assert codes(out) == ["220", "250", "250", "250", "354", "452", "221"]


@pytest.mark.parametrize("rcpts, committed", [
    ([b"rem@y.test"], ["content", "envelope"]),
    ([b"loc@y.test", b"rem@y.test"], ["content", "envelope", "envelope.local"]),
    ([b"loc@y.test"], ["content", "envelope.local"])])
def test_failed_directory_sync_at_commit_leaves_no_envelope(tmp_path, monkeypatch, rcpts, committed):
    # The rename to .envelope happened but may not be durable: the client is
    # told 452 and sends again, so the forwarder must not find a copy too.
    def failing_sync(directory):
        raise OSError(5, "Input/output error")
    dialogue = (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n" +
                b"".join(b"RCPT TO:<" + r + b">\r\n" for r in rcpts) +
                b"DATA\r\nx\r\n.\r\nQUIT\r\n")
    verifier = FakeVerifier({"loc@y.test": ("local", "postmaster")})

    def files():
        return sorted(n.split(".", 4)[-1] for n in os.listdir(str(tmp_path)) if n.startswith("emailrelay."))
    monkeypatch.setattr(spool_message, "fsync_directory", failing_sync)
    out, _, _ = talk(tmp_path, dialogue, verifier=verifier)
    assert codes(out)[-2:] == ["452", "221"] and files() == []
    monkeypatch.undo()
    out, _, _ = talk(tmp_path, dialogue, verifier=verifier)
    assert codes(out)[-2:] == ["250", "221"] and files() == committed


def test_immediate_forwarding_refusal_is_passed_back(tmp_path):
    handle = types.SimpleNamespace(forward=lambda msg_id: "550 mailbox unavailable",
                                   close=lambda: None)
    out, _, _ = talk(tmp_path, ENVELOPE + b"x\r\n.\r\nQUIT\r\n", trigger=lambda: None,
                     immediate=lambda: handle)
    assert "\r\n550 mailbox unavailable\r\n" in out


def test_mail_and_rcpt_arguments_are_read_in_order_and_refused_with_their_reply():
    features = smtp_settings.SmtpSettings.from_config(make_cfg("/tmp")).features
    mail = smtp_params.mail("FROM:<a@b> BODY=8BITMIME SIZE=10 AUTH=x", features, 100)
    assert mail == smtp_params.Mail("a@b", "8bit", "", "", False, "x")
    for arg, reply, bad in [
            ("TO:<a@b>", "553 5.5.2 mailbox name not allowed: invalid mail-from command", True),
            ("FROM:<a@b> SIZE=200 BODY=x", smtp_params.TOO_BIG, False),
            ("FROM:<a@b> BODY=x SIZE=200", "501 5.5.4 invalid argument", True)]:
        with pytest.raises(smtp_params.Refused) as e:
            smtp_params.mail(arg, features, 100)
        assert (e.value.reply, e.value.bad) == (reply, bad)
    address, rest = smtp_params.rcpt_path("TO:<c@d> NOTIFY=NEVER", features)
    assert smtp_params.rcpt_params(address, rest, features, False) == (("NEVER", ""), "c@d")
    with pytest.raises(smtp_params.Refused) as e:
        smtp_params.rcpt_path("FROM:<c@d>", features)
    assert e.value.reply == "550 5.5.2 invalid rcpt-to command" and e.value.bad


def test_parse_path():
    assert smtp_syntax.parse_path("<a@b> SIZE=1", False) == ("a@b", "SIZE=1")
    assert smtp_syntax.parse_path('<"x> y"@b>', False) == ('"x> y"@b', "")
    assert smtp_syntax.parse_path("<@r1,@r2:u@h>", False) == ("u@h", "")
    assert smtp_syntax.parse_path("u@h", False) == ("u@h", "")
    with pytest.raises(ValueError):
        smtp_syntax.parse_path("u@h", False, strict=True)
    assert smtp_syntax.to_alabels("j\u00f6@b\u00fccher.example") == "j\u00f6@xn--bcher-kva.example"
    assert smtp_syntax.to_alabels("a@[1.2.3.4]") == "a@[1.2.3.4]"
    assert smtp_syntax.parse_path("<>", True) == ("", "")
    for bad in ("<>", "<a@b", "<a@b>x", "<a\x00@b>"):
        with pytest.raises(ValueError):
            smtp_syntax.parse_path(bad, False)


def test_rfc5322_date_is_english():
    text = smtp_syntax.rfc5322_date(0)
    assert text[:5] in {d + ", " for d in ("Thu", "Wed", "Fri")}
    assert text[-5] in "+-" and text[-4:].isdigit()


def server_auth(text="server plain alice secret\n", config=None):
    from emailrelay.auth import sasl, secrets
    return sasl.ServerAuth(secrets.Secrets.parse(text), config, domain="relay.test")


def b64(data):
    import base64
    return base64.b64encode(data)


def test_auth_required_then_plain_login_goes_into_envelope_and_received(tmp_path):
    data = (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nAUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n"
            + b"AUTH PLAIN\r\n" + ENVELOPE.split(b"\r\n", 1)[1].replace(b">\r\n", b"> AUTH=alice+40x.test\r\n", 1)
            + b"x\r\n.\r\nQUIT\r\n")
    out, _, _ = talk(tmp_path, data, server_auth=server_auth())
    assert "250-AUTH CRAM-SHA256 CRAM-SHA1 CRAM-MD5 PLAIN LOGIN\r\n" in out
    assert codes(out) == ["220", "250", "530", "235", "503", "250", "250", "354", "250", "221"]
    assert "530 5.7.0 authentication required" in out
    [(content, env)] = stored(tmp_path)
    assert b" with ESMTPA id " in content.split(b"\r\n")[0]
    assert env.authentication == "alice" and env.mail_from_auth_in == "alice+40x.test"


def test_auth_login_challenges_cancel_and_three_failures_close(tmp_path):
    data = (b"EHLO c\r\nAUTH LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\n"
            b"AUTH LOGIN " + b64(b"bob") + b"\r\n" + b64(b"x") + b"\r\n"
            b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\nAUTH CRAM-MD5\r\n" + b64(b"alice 00") + b"\r\n"
            b"NOOP\r\n")
    out, _, _ = talk(tmp_path, data, server_auth=server_auth())
    assert codes(out) == ["220", "250", "334", "334", "501", "334", "535", "535", "334", "421"]
    assert "334 VXNlcm5hbWU6\r\n" in out and "535 5.7.8 authentication failed" in out
    assert out.endswith("421 4.7.0 relay.test too many authentication failures\r\n")


def test_auth_unknown_mechanism_and_cram_md5_success(tmp_path):
    import base64
    import hmac

    class Conn(CountingConnection):
        """Answers the CRAM-MD5 challenge it is given."""
        def _recv(self):
            if self.output.endswith(b"\r\n") and b"334 " in self.output and not self._chunks:
                challenge = base64.b64decode(self.output.split(b"334 ")[-1].strip())
                digest = hmac.new(b"secret", challenge, "md5").hexdigest().encode()
                self._chunks = [b64(b"alice " + digest) + b"\r\nQUIT\r\n"]
            return super()._recv()
    out, _, _ = talk(tmp_path, b"EHLO c\r\nAUTH FOO\r\nAUTH CRAM-MD5\r\n", conn_class=Conn,
                     server_auth=server_auth())
    assert codes(out) == ["220", "250", "504", "334", "235", "221"]


def test_trusted_address_needs_no_auth_and_verifier_gets_keyword(tmp_path):
    v = FakeVerifier({})
    out, _, _ = talk(tmp_path, ENVELOPE + b"x\r\n.\r\nQUIT\r\n", verifier=v,
                     server_auth=server_auth("server plain alice secret\nserver none 127.0.0.0/8 lan\n"))
    assert "250 2.0.0 message processed" in out
    assert v.calls == [("b@y.test", "a@x.test", "127.0.0.1", "relay.test", "none", "lan")]


def test_tls_required_refuses_mail_and_auth(tmp_path):
    out, _, _ = talk(tmp_path, b"EHLO c\r\nAUTH PLAIN\r\nMAIL FROM:<a@x.test>\r\nQUIT\r\n",
                     server_tls_required=True, server_auth=server_auth())
    assert codes(out) == ["220", "250", "530", "530", "221"]
    assert "530 5.7.0 authentication required\r\n" in out
    assert "530 5.7.0 encryption required: use starttls\r\n" in out
