"""The order of a message's syncs and renames before its 250, as the kernel saw it.

README's "Durability" section argues what survives a power cut after each
step; this checks the running program makes those steps in that order
(strace logs every call with the files its descriptors name).
"""

import os
import re
import smtplib

from helpers import Relay

TRACED = "fdatasync,fsync,rename,renameat,renameat2,sendto,write"


def _trace(tmp_path):
    """Stores one message through a relay under strace; returns (trace lines, message id)."""
    trace = os.path.join(str(tmp_path), "trace")
    prefix = ["strace", "-f", "-y", "-s", "40", "-o", trace, "-e", "trace=" + TRACED]
    with Relay(tmp_path, prefix=prefix) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.sendmail("a@x.test", ["b@y.test"], b"Subject: t\r\n\r\nbody\r\n")
        (envelope,) = relay.files(".envelope")
    with open(trace, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines(), envelope[:-len(".envelope")]


def _first(lines, pattern):
    rx = re.compile(pattern)
    for number, line in enumerate(lines):
        if rx.search(line):
            return number
    raise AssertionError("no %r in the trace:\n%s" % (pattern, "\n".join(lines)))


def test_both_files_are_synced_before_the_rename_and_the_directory_before_the_250(tmp_path):
    lines, message_id = _trace(tmp_path)
    name = re.escape(message_id)
    content = _first(lines, r"fdatasync\(\d+<[^>]*%s\.content>\) = 0" % name)
    envelope = _first(lines, r"fdatasync\(\d+<[^>]*%s\.envelope\.new>\) = 0" % name)
    rename = _first(lines, r"rename\w*\(.*%s\.envelope\.new\".*%s\.envelope\"" % (name, name))
    directory = _first(lines, r"fsync\(\d+<%s>\) = 0" % re.escape(os.path.join(str(tmp_path), "relay", "spool")))
    # The first 250 after the rename is DATA's (EHLO's, MAIL's and RCPT's
    # come before the files exist).
    reply = rename + _first(lines[rename:], r"sendto\(\d+<socket:[^>]*>, \"250 ")
    assert content < rename and envelope < rename
    assert rename < directory < reply
