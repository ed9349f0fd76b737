"""The session core's rules, seen through a small protocol and through SMTP and POP.

`Toy` is a protocol of three commands written only on the core, so each
rule (table dispatch, next state only without an error reply, both
bad-command budgets, flush-before-block, the auth-failure budget, the
SASL exchange) is checked once on its own; the SMTP and POP tests below
check that both protocols keep each rule's replies through the core.
"""

import base64
import dataclasses
import threading
import types

import pytest

from emailrelay.auth import auth_budget, sasl, secrets
from emailrelay.config import options
from emailrelay.server import admin, pop_server, session_core, smtp_settings

from test_pop_session import box, make_services as pop_services, session as pop_session  # noqa: F401
from test_smtp_session import CountingConnection, talk

# What the core takes from the configuration; Toy has no idle timeout.
SETTINGS = session_core.SessionSettings(domain="toy.test", idle_timeout=None,
                                        tls_required=False, max_bad_commands=None)


class Toy(session_core.LineSession):
    """START --OPEN--> OPEN --CLOSE--> START; OPEN fails on "OPEN no"."""

    PROTOCOL = "toy"
    TOO_LONG = "ERR too long"

    def __init__(self, conn, services, budget=session_core.BadBudget(0, None, "")):
        super().__init__(conn, services, "START", budget)

    def is_error(self, text):
        return text.startswith("ERR")

    def unknown(self, verb):
        self.bad("ERR unknown")

    def out_of_sequence(self, verb):
        self.bad("ERR sequence")

    def do_open(self, arg):
        self.reply("ERR refused" if arg == "no" else "OK open")

    def do_state(self, arg):
        self.reply("OK " + self.state)

    def do_login(self, arg):
        yield from self.auth_failed("ERR auth", "ERR auth, bye")

    def do_quit(self, arg):
        self.reply("OK bye")

    def do_lock(self, arg):
        self.event("lock")
        self.reply("OK " + self.state)


Toy.COMMANDS = session_core.table(
    ("LOCK", None, Toy.do_lock, None),
    ("OPEN", ("START",), Toy.do_open, "OPEN"),
    ("CLOSE", ("OPEN",), lambda s, arg: s.reply("OK closed"), "START"),
    ("STATE", None, Toy.do_state, None),
    ("LOGIN", None, Toy.do_login, None),
    ("QUIT", None, Toy.do_quit, session_core.DONE),
)
Toy.TRANSITIONS = session_core.transitions(("lock", ("OPEN",), "LOCKED"))


def toy(data, services=None, **kw):
    conn = CountingConnection(data)
    services = services or types.SimpleNamespace(settings=SETTINGS)
    session = Toy(conn, services, **kw)
    session.run()
    assert conn.closed
    return conn.output.decode().split("\r\n")[:-1], conn, session


def test_next_state_only_when_the_reply_is_not_an_error():
    lines, _, _ = toy(b"OPEN no\r\nSTATE\r\nCLOSE\r\nOPEN\r\nSTATE\r\nOPEN\r\nCLOSE\r\nSTATE\r\n"
                      b"QUIT\r\nSTATE\r\n")
    assert lines == ["ERR refused", "OK START", "ERR sequence", "OK open", "OK OPEN",
                     "ERR sequence", "OK closed", "OK START", "OK bye"]


def test_pipelined_commands_get_their_replies_in_one_send():
    lines, conn, _ = toy(b"STATE\r\nSTATE\r\nSTATE\r\nQUIT\r\n")
    assert lines == ["OK START"] * 3 + ["OK bye"] and conn.sends == 1
    lines, conn, _ = toy([b"STATE\r\n", b"STATE\r\n", b"QUIT\r\n"])
    assert conn.sends == 3


def test_bad_budget_with_a_last_reply_replaces_the_reply_after_the_limit():
    budget = session_core.BadBudget(2, "ERR too many", "toy: too many")
    lines, _, session = toy(b"X\r\nY\r\nZ\r\nSTATE\r\n", budget=budget)
    assert lines == ["ERR unknown", "ERR unknown", "ERR too many"]
    assert session.bad_commands == 3 and session.error_replies == 3


def test_bad_budget_without_a_last_reply_ends_after_the_limits_own_reply():
    budget = session_core.BadBudget(2, None, "toy: too many")
    lines, _, _ = toy(b"X\r\n" + b"Y" * 600 + b"\r\nSTATE\r\n", budget=budget)
    assert lines == ["ERR unknown", "ERR too long"]


def test_auth_failures_end_the_session_at_the_third_and_count_per_address():
    budget = auth_budget.FailureBudget(allowed=1, max_delay=1)
    stop = threading.Event()
    stop.set()  # the owed delay is a "sleep": cut short, it still happens in order
    services = types.SimpleNamespace(settings=SETTINGS, auth_budget=budget, stop_event=stop)
    lines, _, session = toy(b"LOGIN\r\nLOGIN\r\nLOGIN\r\nSTATE\r\n", services=services)
    assert lines == ["ERR auth", "ERR auth", "ERR auth, bye"]
    assert session.auth_failures == 3
    assert budget.record("127.0.0.1", "toy") == 1.0  # the fourth: capped at max_delay


def test_smtp_and_pop_share_the_sasl_exchange_and_its_line_limit(box):  # noqa: F811
    long = b"A" * 13000  # over both limits (SMTP 12288, POP 8192)
    out, _, _ = talk(box["tmp"], b"EHLO c\r\nAUTH LOGIN\r\n" + long + b"\r\nQUIT\r\n",
                     server_auth=_auth(box))
    assert "334 VXNlcm5hbWU6\r\n500 5.5.2 line too long\r\n221" in out
    out, _ = pop_session(pop_services(box), "AUTH LOGIN", long + b"\r\n", "QUIT")
    assert "+ VXNlcm5hbWU6\r\n-ERR authentication response too long\r\n+OK" in out


def test_smtp_and_pop_forget_a_cancelled_exchange_alike(box):  # noqa: F811
    out, _, _ = talk(box["tmp"], b"EHLO c\r\nAUTH LOGIN\r\n*\r\nQUIT\r\n",
                     server_auth=_auth(box))
    assert "501 5.7.0 authentication cancelled" in out
    user = base64.b64encode(b"alice").decode()
    out, _ = pop_session(pop_services(box), "AUTH LOGIN", user, "*", "STAT", "QUIT")
    assert "-ERR authentication cancelled\r\n-ERR STAT is not valid in this state" in out


def test_smtp_default_budget_drops_at_the_eighth_error_and_counts_states(tmp_path):
    out, _, _ = talk(tmp_path, b"EHLO c\r\nRCPT TO:<a@b>\r\n" * 1 + b"X\r\n" * 8 + b"NOOP\r\n",
                     given=())
    assert out.count("500 5.5.1 command unrecognized") == 7
    assert "503 5.5.1 command out of sequence" in out and "noop" not in out


def test_pop_login_is_the_only_way_to_transaction(box):  # noqa: F811
    assert set(pop_server.COMMANDS["PASS"].states) == {pop_server.AUTHORIZATION}
    out, _ = pop_session(pop_services(box), "USER alice", "PASS wrong", "STAT",
                         "USER alice", "PASS secret", "STAT", "QUIT")
    lines = out.split("\r\n")
    assert lines[3] == "-ERR STAT is not valid in this state"
    assert lines[5].startswith("+OK maildrop has 2 messages") and lines[6].startswith("+OK 2 ")


def _auth(box):  # noqa: F811
    return sasl.ServerAuth(secrets.Reloadable(box["auth"]), "")


def test_a_handler_changes_state_only_through_the_transitions_table():
    lines, _, _ = toy(b"LOCK\r\nOPEN\r\nLOCK\r\nCLOSE\r\nQUIT\r\n")
    # From START "lock" does not happen; from OPEN it leads to LOCKED, where
    # CLOSE is out of sequence.
    assert lines == ["OK START", "OK open", "OK LOCKED", "ERR sequence", "OK bye"]


def test_settings_are_read_once_and_interpreted_per_protocol():
    cfg = options.parse(["--spool-dir", "/tmp", "--domain", "", "--idle-timeout", "0"])
    smtp = smtp_settings.SmtpSettings.from_config(cfg)
    assert smtp.domain == "localhost" and smtp.idle_timeout is None
    assert smtp.max_bad_commands is None and smtp.greeting == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        smtp.domain = "x"
    with pytest.raises(TypeError):
        smtp.features["dsn"] = False
    # Without --idle-timeout POP and admin wait 600 s, SMTP the option's default.
    cfg = options.parse(["--spool-dir", "/tmp", "--max-bad-commands", "3"])
    assert smtp_settings.SmtpSettings.from_config(cfg).idle_timeout == 60
    pop = pop_server.PopSettings.from_config(cfg)
    assert pop.idle_timeout == 600 and pop.max_bad_commands == 3
    assert admin.AdminSettings.from_config(cfg).idle_timeout == 600
    cfg = options.parse(["--spool-dir", "/tmp", "--idle-timeout", "5"])
    assert admin.AdminSettings.from_config(cfg).idle_timeout == 5
