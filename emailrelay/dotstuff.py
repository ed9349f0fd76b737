"""The SMTP/POP3 text writer: stored content as it goes on the wire.

`Stuffer` turns stored message bytes, fed in blocks of any size, into the
octets of an SMTP DATA payload or a POP3 multi-line response (RFC 5321
4.5.2, RFC 1939 3): every line ending (CRLF, bare CR, bare LF) becomes CRLF,
a line that starts with a dot gets another dot, NUL octets are dropped, and
`end()` completes a last line without an ending and adds the `.` line.
Memory use is one block. `blocks(f)` does it for a whole binary file.

Why NUL is dropped: RFC 5321 does not allow it in text, and a receiver that
strips NUL itself would read `CRLF NUL . CRLF` as the end of the data;
dropping it before dot-stuffing means such a line goes out as `..`. Content
that must keep every octet goes by BDAT (BINARYMIME), never through here.
"""

import re

BLOCK_SIZE = 65536
_EOL = re.compile(b"\r\n|\r|\n")


class Stuffer:
    """Feeds on stored bytes and returns wire bytes; see the module docstring.

    `feed(block)` returns the wire bytes for `block` (possibly empty: a CR
    at the end of a block is held back until the next one shows whether an
    LF follows); `end()` returns the rest and the terminator line.
    """

    def __init__(self):
        self._at_line_start = True
        self._pending_cr = False

    def feed(self, block):
        if self._pending_cr:
            block = b"\r" + block
            self._pending_cr = False
        if b"\0" in block:
            block = block.replace(b"\0", b"")
        if block.endswith(b"\r"):
            block = block[:-1]
            self._pending_cr = True
        if not block:
            return b""
        crlf = block.count(b"\r\n")
        if block.count(b"\r") != crlf or block.count(b"\n") != crlf:
            block = _EOL.sub(b"\r\n", block)
        if self._at_line_start and block.startswith(b"."):
            block = b"." + block
        block = block.replace(b"\r\n.", b"\r\n..")
        self._at_line_start = block.endswith(b"\r\n")
        return block

    def end(self):
        out = b""
        if self._pending_cr:
            self._pending_cr = False
            self._at_line_start = True
            out = b"\r\n"
        return out + (b".\r\n" if self._at_line_start else b"\r\n.\r\n")


def blocks(f, block_size=BLOCK_SIZE):
    """Yields the wire bytes for the content of binary file `f`, terminator last."""
    stuffer = Stuffer()
    while True:
        block = f.read(block_size)
        if not block:
            break
        out = stuffer.feed(block)
        if out:
            yield out
    yield stuffer.end()
