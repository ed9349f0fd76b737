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

Both are generators in the `session_loop` style: they yield ("read", n)
requests for input and are run with `yield from` inside a conversation.
"""

BLOCK = 65536
# A line longer than this is passed on in pieces rather than buffered.
SPLIT = BLOCK
TERMINATOR = b"\r\n.\r\n"


class Text:
    """What a reader found: octets kept, 8-bit or not, and the first fault (or None)."""

    def __init__(self, size_limit=0):
        self.size_limit = size_limit
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
    pending = b"\r\n"   # a virtual CRLF before the first line
    first = True
    while True:
        chunk = yield ("read", BLOCK)
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
    while size > 0:
        chunk = yield ("read", min(size, BLOCK))
        if not chunk:
            raise EOFError()
        size -= len(chunk)
        if write is not None and text.fault is None:
            text._keep(chunk, write)
