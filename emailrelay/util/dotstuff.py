"""The SMTP/POP3 text writer: stored content as it goes on the wire.

Both writers here apply the same rules (RFC 5321 4.5.2, RFC 1939 3): every
line ending (CRLF, bare CR, bare LF) becomes CRLF, NUL octets are dropped,
and a line that starts with a dot gets another dot; memory use is bounded
whatever the line length.

- `Stuffer` / `blocks(f)` work block by block and add the `.` line: the SMTP
  client uses them, where only speed matters.
- `normalise_lines(blocks)` / `file_blocks(f)` yield one line at a time
  (a line longer than MAX_PIECE in parts) and leave the `.` line to the
  caller, for a writer that counts lines.
- `write_text(f, write, body_lines)` writes a stored message for POP: by
  blocks for RETR, by lines for TOP (which counts body lines).

Why NUL is dropped: RFC 5321 does not allow it in text, and a receiver that
strips NUL itself would read `CRLF NUL . CRLF` as the end of the data;
dropping it before dot-stuffing means such a line goes out as `..`. Content
that must keep every octet goes by BDAT (BINARYMIME), never through here.
"""


import re

BLOCK_SIZE = 65536
_EOL = re.compile(b"\r\n|\r|\n")
# A line longer than this is yielded in parts of about this size.
MAX_PIECE = 65536


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


def normalise_lines(blocks):
    """Yields the text of `blocks` as `Stuffer` makes it, a line at a time.

    Each piece is one line ending in CRLF or, for a line longer than
    MAX_PIECE, a part of it without one; the `.` line is not included.
    """
    stuffer = Stuffer()
    carry = b""
    for block in blocks:
        carry = yield from _lines(carry + stuffer.feed(block))
    # end() is the missing line ending, if any, then the `.` line.
    carry = yield from _lines(carry + stuffer.end()[:-3])
    if carry:
        yield carry


def _lines(data):
    """Yields the whole lines in `data` (and an overlong partial one); returns the rest."""
    start = 0
    while True:
        end = data.find(b"\r\n", start)
        if end < 0:
            break
        yield data[start:end + 2]
        start = end + 2
    rest = data[start:]
    if len(rest) > MAX_PIECE:
        yield rest
        rest = b""
    return rest


def file_blocks(f, size=MAX_PIECE):
    """The blocks of an open binary file, for normalise_lines()."""
    while True:
        block = f.read(size)
        if not block:
            return
        yield block


def write_text(f, write, body_lines=None):
    """Writes the content of binary file `f` through `write` as it goes on the wire.

    The `.` line comes last. With `body_lines` (POP TOP), only the header,
    the blank line after it and that many body lines.
    """
    if body_lines is None:
        for out in blocks(f):
            write(out)
        return
    in_body = False
    count = 0
    line_start = True
    for piece in normalise_lines(file_blocks(f)):
        if in_body and count >= body_lines:
            break
        write(piece)
        ends = piece.endswith(b"\r\n")
        if ends:
            if in_body:
                count += 1
            elif line_start and piece == b"\r\n":
                in_body = True
        line_start = ends
    write(b".\r\n")
