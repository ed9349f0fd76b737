"""Reading SMTP message text: DATA (dot-stuffed) and BDAT chunks, streamed.

Both readers pass the text on to a `write(bytes)` callable in blocks and
never hold a whole message, nor a whole line: text lines of any length are
accepted (RFC 5321's 1000-octet line limit is not enforced on text, as
Postfix does not; the 512-octet limit applies to commands only). They keep
a running `Text` tally of the size, whether any octet has the top bit set,
and of the first fault ("big": over the size limit; "storage": `write`
raised OSError, kept in `Text.error`); once a fault is set the rest of the
text is still read, so that it is not taken for commands, but dropped.
`read_data` raises `EOFError` if the client goes away first.

Both are generators in the `session_loop` style: they ask for input with
`requests.read(n)` and are run with `yield from` inside a conversation.

A `Pace` given to the tally holds the text to a least average rate
(--min-data-rate): a client that dribbles its text, which the idle timeout
alone would let hold its connection for ever, gets `TooSlow`.
"""

import time

from ..net import connection, requests

BLOCK = 65536
# A line longer than this is passed on in pieces rather than buffered.
SPLIT = BLOCK
TERMINATOR = b"\r\n.\r\n"


class TooSlow(Exception):
    """The text arrived more slowly than its `Pace` allows."""


class Pace:
    """The least rate at which one message's text must arrive (Postfix's smtpd_min_data_rate).

    The text's deadline starts `idle` seconds (the idle timeout) after
    the first read and moves 1/`rate` seconds later with every octet
    received, over all the reads of one message (DATA, or every BDAT chunk
    up to LAST). A read waits until the idle timeout or the deadline,
    whichever is sooner; past the deadline `read` raises TooSlow. The
    connection's timeout is shortened only while the deadline is the
    sooner, so a client sending at a fair rate costs nothing more.
    """

    def __init__(self, conn, idle, rate, clock=time.monotonic):
        self.conn = conn
        self.idle = idle
        self.rate = float(rate)
        self.clock = clock
        self.deadline = None
        self.shortened = False

    def read(self, n):
        """The "read" request for at most `n` octets, under the deadline (a generator)."""
        now = self.clock()
        if self.deadline is None:
            self.deadline = now + self.idle
        left = self.deadline - now
        if left < self.idle:
            if left <= 0:
                raise TooSlow()
            self.conn.settimeout(left)
            self.shortened = True
        elif self.shortened:
            self.restore()
        try:
            data = yield requests.read(n)
        except connection.Timeout:
            if self.shortened:
                raise TooSlow() from None
            raise
        self.deadline += len(data) / self.rate
        return data

    def restore(self):
        """Gives the connection back its idle timeout (the text has ended)."""
        if self.shortened:
            self.conn.settimeout(self.idle)
            self.shortened = False


class Text:
    """What a reader found: octets kept, 8-bit or not, and the first fault (or None).

    `pace` (a `Pace`, or None) is the rate the text must keep up.
    """

    def __init__(self, size_limit=0, pace=None):
        self.size_limit = size_limit
        self.pace = pace
        self.size = 0
        self.eightbit = False
        self.fault = None
        self.error = None

    def _keep(self, data, write):
        self.size += len(data)
        if self.size_limit and self.size > self.size_limit:
            self.fault = "big"
            return
        if not self.eightbit and not data.isascii():
            self.eightbit = True
        try:
            write(data)
        except OSError as e:
            self.fault = "storage"
            self.error = e


def read_data(conn, write, text):
    """Reads DATA text up to <CRLF>.<CRLF>, un-dot-stuffed, into `write`.

    Only CRLF '.' CRLF ends the text: a bare CR or LF next to the dot never
    does (no SMTP smuggling). A leading dot is removed from every line (RFC
    5321 4.5.2). Input after the terminator is pushed back onto `conn` for
    the command reader.
    """
    try:
        yield from _read_data(conn, write, text)
    finally:
        if text.pace is not None:
            text.pace.restore()


def _read_data(conn, write, text):
    pending = b"\r\n"   # a virtual CRLF before the first line
    first = True
    pace = text.pace
    while True:
        chunk = (yield requests.read(BLOCK)) if pace is None else (yield from pace.read(BLOCK))
        if not chunk:
            raise EOFError()
        data = pending + chunk
        end = data.find(TERMINATOR)
        if end >= 0:
            conn.unread(data[end + 5:])
            body = data[:end + 2]
        elif text.fault is not None:
            pending = data[-4:]
            continue
        else:
            k = data.rfind(b"\r\n")
            if len(data) - k > SPLIT:
                # A long line: pass it on but for a tail short enough not
                # to hold a CRLF, so that no line start or terminator is cut.
                k = len(data) - 4
            body, pending = data[:k], data[k:]
        if text.fault is None:
            if b"\r\n." in body:
                body = body.replace(b"\r\n.", b"\r\n")
            if first and body:
                body = body[2:]
                first = False
            text._keep(body, write)
        if end >= 0:
            return


def read_chunk(size, write, text):
    """Reads exactly `size` octets of a BDAT chunk into `write` (None: drop them)."""
    pace = text.pace
    try:
        while size > 0:
            n = min(size, BLOCK)
            chunk = (yield requests.read(n)) if pace is None else (yield from pace.read(n))
            if not chunk:
                raise EOFError()
            size -= len(chunk)
            if write is not None and text.fault is None:
                text._keep(chunk, write)
    finally:
        if pace is not None:
            pace.restore()
