"""Stored message text made safe to send as SMTP DATA or a POP3 multi-line reply.

`normalise_lines(blocks)` takes the content as an iterator of byte blocks
of any size and yields it as pieces ready to write:

- every line ending (CRLF, a bare LF or a bare CR) becomes CRLF, so no
  receiver, whatever it takes a line ending to be, sees a line that the
  sender did not (a `\\r.\\r` cannot become a lone `.` line);
- NUL octets are dropped (RFC 5321 4.5.2 and RFC 1939 do not allow them in
  text, and a NUL-stripping receiver would otherwise see `\\r\\n\\x00.\\r\\n`
  as the end of the data);
- a line starting with `.` gets another `.` (dot-stuffing), after NULs are
  dropped;
- a final line without an ending gets CRLF.

Each yielded piece is either one whole line ending in CRLF, or, for a line
longer than MAX_PIECE octets, a part of it not ending in CRLF (memory stays
bounded whatever the line length). The terminating `.` line is the
caller's.
"""

import re

# A line longer than this is yielded in parts of about this size.
MAX_PIECE = 65536

_ENDING = re.compile(b"\r\n|\r|\n")


def normalise_lines(blocks):
    """Yields the text of `blocks` normalised as the module docstring says."""
    carry = b""
    at_start = True
    for block in blocks:
        if not block:
            continue
        data = carry + block.replace(b"\0", b"")
        # A CR at the end may be the first half of a CRLF split across blocks.
        hold_cr = data.endswith(b"\r")
        if hold_cr:
            data = data[:-1]
        pieces = _ENDING.split(data)
        carry = pieces.pop()
        for line in pieces:
            if at_start and line.startswith(b"."):
                line = b"." + line
            yield line + b"\r\n"
            at_start = True
        if len(carry) > MAX_PIECE:
            if at_start and carry.startswith(b"."):
                carry = b"." + carry
            yield carry
            carry = b""
            at_start = False
        if hold_cr:
            carry += b"\r"
    if carry:
        if carry.endswith(b"\r"):
            carry = carry[:-1]
        if at_start and carry.startswith(b"."):
            carry = b"." + carry
        yield carry + b"\r\n"


def file_blocks(f, size=MAX_PIECE):
    """The blocks of an open binary file, for normalise_lines()."""
    while True:
        block = f.read(size)
        if not block:
            return
        yield block
