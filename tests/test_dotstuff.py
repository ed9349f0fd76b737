"""dotstuff.normalise_lines: CRLF, NUL and dot-stuffing at every block boundary."""

import pytest

from emailrelay import dotstuff


def run(content, size):
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
        assert run(content, size) == wire, size


def test_a_long_line_comes_in_bounded_parts_and_is_stuffed_once():
    content = b"." + b"x" * (3 * dotstuff.MAX_PIECE) + b"\r\n.y\r\n"
    pieces = list(dotstuff.normalise_lines(iter([content[i:i + 10000]
                                                 for i in range(0, len(content), 10000)])))
    assert max(len(p) for p in pieces) <= dotstuff.MAX_PIECE + 10002
    assert b"".join(pieces) == b"." + content[:-4] + b"..y\r\n"
