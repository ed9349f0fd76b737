"""--debug: the server dialogue, program runs and spool changes, never secrets or text."""

import base64
import poplib
import re
import smtplib
import stat

from helpers import Relay

SMTP_PASSWORD = "smtp-pw-7f3a"
POP_PASSWORD = "pop-pw-91c2"
MARKER = "body-marker-5d1e"


def test_debug_logs_dialogue_programs_and_spool_changes(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.write_text("server plain alice %s\n" % SMTP_PASSWORD)
    pop_secrets = tmp_path / "pop-secrets"
    pop_secrets.write_text("server plain bob %s\n" % POP_PASSWORD)
    for p in (secrets, pop_secrets):
        p.chmod(0o600)
    filt = tmp_path / "filter.sh"
    filt.write_text("#!/bin/sh\nexit 0\n")
    filt.chmod(filt.stat().st_mode | stat.S_IXUSR)
    with Relay(tmp_path, ["--debug", "--server-auth", str(secrets), "--pop-auth",
                          str(pop_secrets), "--filter", str(filt)], pop=True) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo()
            c.login("alice", SMTP_PASSWORD)
            c.sendmail("a@example.com", ["b@example.com"],
                       "Subject: debug\r\n\r\n%s\r\n" % MARKER)
        p = poplib.POP3("127.0.0.1", relay.pop_port, timeout=10)
        p.user("bob")
        p.pass_(POP_PASSWORD)
        assert MARKER.encode() in b"\n".join(p.retr(1)[1])
        p.dele(1)
        p.quit()
        relay.wait_log(r"spool: emailrelay\.[0-9.]+\.envelope: removed")
        log = relay.log()
    # The SMTP dialogue is logged from --verbose up (as info lines).
    assert re.search(r"smtp: rx: MAIL FROM:<a@example\.com>", log, re.I)
    assert "smtp: tx: 250 message processed" in log
    assert re.search(r"smtp: rx: AUTH (CRAM-MD5|PLAIN)\n", log)
    assert re.search(r"debug: pop: rx: USER bob\n", log)
    assert re.search(r"debug: pop: rx: PASS <password>\n", log)
    assert re.search(r"debug: pop: tx: \+OK", log)
    assert re.search(r"debug: pop: rx: RETR 1\n", log)
    assert re.search(r"debug: ran %s \S+\.content \S+\.envelope\.new: exit 0\n" % re.escape(str(filt)), log)
    assert re.search(r"debug: spool: emailrelay\.[0-9.]+: committed \(\d+ octets\)\n", log)
    # Never a password, an encoded credential or message text.
    for secret in (SMTP_PASSWORD, POP_PASSWORD, MARKER,
                   base64.b64encode(("\0alice\0" + SMTP_PASSWORD).encode()).decode()):
        assert secret not in log, secret
