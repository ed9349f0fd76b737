"""Start-up recovery of what a killed relay left in the spool."""

import os
import smtplib
import time

from helpers import Relay, wait_for


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_content_without_envelope_of_a_killed_relay_is_moved_aside(tmp_path):
    relay = Relay(tmp_path)
    client = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
    client.ehlo()
    client.mail("a@example.com")
    client.rcpt("b@example.com")
    assert client.docmd("DATA")[0] == 354
    client.send(b"Subject: cut short\r\n\r\nhalf")
    content = wait_for(lambda: relay.files(".content"), what="content file")[0]
    relay.kill()
    client.close()
    stem = content[:-len(".content")]
    path = os.path.join(relay.spool, content)
    _age(path, 3600)
    # A recent one (perhaps another process's, in another pid namespace) and
    # one of a live process (this test's pid) are left alone, however old.
    young = os.path.join(relay.spool, "emailrelay.999999.1700000000.1.content")
    with open(young, "wb") as f:
        f.write(b"being received")
    live = os.path.join(relay.spool, "emailrelay.%d.1700000000.1.content" % os.getpid())
    with open(live, "wb") as f:
        f.write(b"being received")
    _age(live, 3600)

    relay.start()
    try:
        relay.wait_log(r"warning: spool: content with no envelope moved aside: %s\.content\.orphan"
                       % stem.replace(".", r"\."))
        assert os.path.isfile(os.path.join(relay.spool, stem + ".content.orphan"))
        assert not os.path.exists(path)
        assert os.path.exists(young) and os.path.exists(live)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: next\r\n\r\nok\r\n")
    finally:
        relay.stop()
    assert len(relay.files(".envelope")) == 1
    assert relay.log().count("moved aside") == 1
