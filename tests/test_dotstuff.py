"""dotstuff: stored content as it goes on the wire (SMTP DATA, POP3 RETR and TOP)."""

import io

import pytest

from emailrelay.util import dotstuff


def encode(content, block_size=dotstuff.BLOCK_SIZE):
    return b"".join(dotstuff.blocks(io.BytesIO(content), block_size))


@pytest.mark.parametrize("content, wire", [
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
    (b"a\rb\r", b"a\r\nb\r\n.\r\n"),
    (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
    (b".start\r\n..two\r\nmid.dle\r\n.\r\n", b"..start\r\n...two\r\nmid.dle\r\n..\r\n.\r\n"),
    (b"x\n.\ny", b"x\r\n..\r\ny\r\n.\r\n"),
    (b"", b".\r\n"),
    # NUL is dropped before dot-stuffing: a NUL-stripping receiver never
    # sees a lone dot line.
    (b"a\r\n\x00.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"\x00\x00", b".\r\n"),
    (b"a\x00b\r\n", b"ab\r\n.\r\n"),
    # A bare CR line end before a dot cannot end the data either.
    (b"a\r.\rb", b"a\r\n..\r\nb\r\n.\r\n"),
])
def test_wire_form(content, wire):
    assert encode(content) == wire


def test_the_same_for_any_block_size():
    content = b".a\r\nb\rc\n\r\n.\r.\n..\r\r\n\n\rend\r\x00\n\x00.\r\n"
    whole = encode(content)
    assert b"\r\n.\r\n" not in whole[:-3] and b"\x00" not in whole
    for size in range(1, 12):
        assert encode(content, size) == whole


def test_stuffer_is_usable_with_any_source():
    s = dotstuff.Stuffer()
    out = s.feed(b".x\r") + s.feed(b"\n.y") + s.end()
    assert out == b"..x\r\n..y\r\n.\r\n"


def run_lines(content, size):
    blocks = [content[i:i + size] for i in range(0, len(content), size)]
    return b"".join(dotstuff.normalise_lines(iter(blocks)))


@pytest.mark.parametrize("content, wire", [
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\nb", b"a\r\nb\r\n"),
    (b"a\rb\r", b"a\r\nb\r\n"),
    (b"a\r\r\nb", b"a\r\n\r\nb\r\n"),
    (b"\r.\r", b"\r\n..\r\n"),
    (b"x\r\n\x00.\r\n", b"x\r\n..\r\n"),
    (b"\r\x00\n.", b"\r\n..\r\n"),
    (b".a\r\n..b\r\nc.\r\n", b"..a\r\n...b\r\nc.\r\n"),
    (b"x\n\r", b"x\r\n\r\n"),
    (b"", b""),
])
def test_normalised_whatever_the_block_size(content, wire):
    for size in range(1, len(content) + 2):
        assert run_lines(content, size) == wire, size


def test_a_long_line_comes_in_bounded_parts_and_is_stuffed_once():
    content = b"." + b"x" * (3 * dotstuff.MAX_PIECE) + b"\r\n.y\r\n"
    pieces = list(dotstuff.normalise_lines(iter([content[i:i + 10000]
                                                 for i in range(0, len(content), 10000)])))
    assert max(len(p) for p in pieces) <= dotstuff.MAX_PIECE + 10002
    assert b"".join(pieces) == b"." + content[:-4] + b"..y\r\n"
