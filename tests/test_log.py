"""Logging: levels, line format, sanitising, the daily %d log file, reopen,
syslog and the journal."""

import os
import re
import subprocess
import time

import pytest

import syslogd
from emailrelay.runtime import log
from emailrelay.config import options
from helpers import BIN, PYTHON, ROOT, env, free_port


@pytest.fixture(autouse=True)
def reset_log():
    yield
    log.configure(options.parse(["--no-syslog"]))


def configure(*argv):
    log.configure(options.parse(["--no-syslog"] + list(argv)))


def emit_all():
    log.error("e1")
    log.warning("w1")
    log.info("i1")
    log.verbose("v1")
    log.debug("d1")


def test_without_log_only_warnings_and_errors(capsys):
    configure()
    emit_all()
    assert capsys.readouterr().err == "emailrelay: error: e1\nemailrelay: warning: w1\n"


def test_log_adds_info(capsys):
    configure("--log")
    emit_all()
    assert capsys.readouterr().err.splitlines() == [
        "emailrelay: error: e1", "emailrelay: warning: w1", "emailrelay: info: i1"]
    assert not log.verbose_enabled() and not log.debug_enabled()


def test_log_verbose_adds_verbose_lines_as_info(capsys):
    configure("--log", "--verbose")
    emit_all()
    assert capsys.readouterr().err.splitlines()[2:] == [
        "emailrelay: info: i1", "emailrelay: info: v1"]
    assert not log.debug_enabled()


def test_debug_adds_debug_lines(capsys):
    configure("--log", "--debug")
    emit_all()
    assert capsys.readouterr().err.splitlines()[-1] == "emailrelay: debug: d1"
    assert log.debug_enabled()


def test_log_time_format(capsys):
    configure("--log", "--log-time")
    log.info("hello")
    line = capsys.readouterr().err
    assert re.fullmatch(r"emailrelay: \d{8}\.\d{6}\.\d{3}: info: hello\n", line)


def test_log_address_only_with_the_option(capsys):
    configure("--log")
    log.info("session", peer="192.0.2.1:1234")
    configure("--log", "--log-address")
    log.info("session", peer="192.0.2.1:1234")
    log.info("no peer")
    assert capsys.readouterr().err.splitlines() == [
        "emailrelay: info: session", "emailrelay: info: 192.0.2.1:1234: session",
        "emailrelay: info: no peer"]


@pytest.mark.parametrize("raw,clean", [
    ("plain text", "plain text"),
    ("two\r\nlines", "two\\x0d\\x0alines"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("tab\there", "tab\\x09here"),
    ("nul\x00del\x7f", "nul\\x00del\\x7f"),
    ("c1\x9bcsi", "c1\\x9bcsi"),
    ("bidi\u202eevil", "bidi\\u202eevil"),
    ("sep\u2028x", "sep\\u2028x"),
    ("caf\u00e9", "caf\u00e9"),
    (b"bytes\xff\n", "bytes\\xff\\x0a"),
    (42, "42"),
])
def test_sanitise(raw, clean):
    assert log.sanitise(raw) == clean
    assert log.sanitise(log.sanitise(raw)) == clean


def test_sanitise_every_ascii_character():
    # Printable ASCII takes a short cut past the table: every ASCII
    # character, alone and in a line, comes out as the table makes it.
    for c in range(0x80):
        expected = "\\x%02x" % c if c < 0x20 or c == 0x7f else chr(c)
        assert log.sanitise(chr(c)) == expected
        assert log.sanitise("a%sb" % chr(c)) == "a%sb" % expected


def test_every_line_is_sanitised(capsys):
    configure("--log", "--log-address")
    log.info("from network: EVIL\r\nemailrelay: error: forged\x1b[2J", peer="1.2.3.4:5\n")
    out = capsys.readouterr().err
    assert out.count("\n") == 1
    assert "\x1b" not in out and "\r" not in out
    assert "1.2.3.4:5\\x0a: " in out


def test_log_file_instead_of_stderr(tmp_path, capsys):
    path = tmp_path / "relay.log"
    configure("--log", "--log-file", str(path))
    log.info("to the file")
    log.error("error too")
    assert capsys.readouterr().err == ""
    assert path.read_text() == "emailrelay: info: to the file\nemailrelay: error: error too\n"


def test_log_file_with_day_is_named_by_date_and_rolls_over(tmp_path, monkeypatch):
    day1 = time.mktime((2024, 1, 31, 23, 59, 59, 0, 0, -1))
    clock = [day1]
    monkeypatch.setattr(log, "now", lambda: clock[0])
    configure("--log", "--log-file", str(tmp_path / "emailrelay-%d.log"))
    log.info("last of january")
    clock[0] = day1 + 2
    log.info("first of february")
    assert sorted(os.listdir(tmp_path)) == ["emailrelay-20240131.log", "emailrelay-20240201.log"]
    assert (tmp_path / "emailrelay-20240131.log").read_text() == \
        "emailrelay: info: last of january\n"
    assert (tmp_path / "emailrelay-20240201.log").read_text() == \
        "emailrelay: info: first of february\n"


def test_reopen_follows_a_rotated_file(tmp_path):
    path = tmp_path / "relay.log"
    configure("--log", "--log-file", str(path))
    log.info("before")
    os.rename(str(path), str(tmp_path / "relay.log.1"))
    log.info("still old")
    log.reopen()
    log.info("after")
    assert (tmp_path / "relay.log.1").read_text() == \
        "emailrelay: info: before\nemailrelay: info: still old\n"
    assert path.read_text() == "emailrelay: info: after\n"


def test_unwritable_log_file_is_an_error_at_configure(tmp_path):
    with pytest.raises(OSError):
        configure("--log-file", str(tmp_path / "no" / "such" / "dir" / "log"))


def test_syslog_gets_lines(monkeypatch):
    import syslog
    calls = []
    monkeypatch.setattr(syslog, "openlog", lambda *a: calls.append(("open",) + a))
    monkeypatch.setattr(syslog, "syslog", lambda *a: calls.append(a))
    monkeypatch.setattr(syslog, "closelog", lambda: calls.append(("close",)))
    log.configure(options.parse(["--log", "--syslog=local2", "--log-file", os.devnull]))
    log.warning("careful\n")
    assert calls[0] == ("open", "emailrelay", syslog.LOG_PID, syslog.LOG_LOCAL2)
    assert calls[1] == (syslog.LOG_WARNING, "warning: careful\\x0a")
    log.configure(options.parse(["--log", "--no-syslog", "--log-file", os.devnull]))
    log.warning("not to syslog")
    assert calls[2:] == [("close",)]


def test_syslog_default_facility_is_mail_and_syslog_overrides_no_syslog(monkeypatch):
    import syslog
    calls = []
    monkeypatch.setattr(syslog, "openlog", lambda *a: calls.append(a))
    monkeypatch.setattr(syslog, "syslog", lambda *a: None)
    monkeypatch.setattr(syslog, "closelog", lambda: None)
    log.configure(options.parse(["--as-client", "h:25", "--syslog", "--log-file", os.devnull]))
    log.error("x")
    assert calls == [("emailrelay", syslog.LOG_PID, syslog.LOG_MAIL)]


@pytest.mark.skipif(not syslogd.usable(), reason="needs root and mount namespaces")
@pytest.mark.parametrize("journal", [False, True])
def test_lines_reach_the_journal_once(tmp_path, journal):
    """Under a unit with StandardError=journal, a line goes to syslog or stderr, not both."""
    spool = tmp_path / "spool"
    spool.mkdir()
    submitted = subprocess.run([os.path.join(BIN, "emailrelay-submit"), "--spool-dir", str(spool),
                                "b@y.test"], input=b"\nhi\n", env=env(), timeout=30)
    assert submitted.returncode == 0
    stderr_path = tmp_path / "stderr"
    run_env = env()
    run_env.pop("JOURNAL_STREAM", None)
    with open(str(stderr_path), "wb") as stderr, syslogd.SyslogReceiver(tmp_path / "sys") as syslog:
        if journal:
            st = os.fstat(stderr.fileno())
            run_env["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
        dead = free_port()
        ran = subprocess.run(syslog.command([
            PYTHON, "-m", "emailrelay", "--as-client", "127.0.0.1:%d" % dead, "--syslog",
            "--user", "root", "--spool-dir", str(spool)]), cwd=ROOT, env=run_env,
            stdout=subprocess.DEVNULL, stderr=stderr, timeout=60)
        assert ran.returncode == 1
        syslog.wait_for(r"emailrelay\[\d+\]: error: forwarding: cannot connect to ")
    written = stderr_path.read_text()
    if journal:
        assert written == ""
    else:
        assert "emailrelay: error: forwarding: cannot connect to " in written
