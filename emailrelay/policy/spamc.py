"""A SpamAssassin `spamd` client: the `spam:` and `spam-edit:` filters.

`check(location, content_path, timeout, edit)` sends one message to spamd
with `PROCESS SPAMC/1.4` (headers `User:` and `Content-length:`, a blank
line, the content, then a half-close) and reads the answer: a status line
(`SPAMD/1.1 0 EX_OK`), headers (`Spam: True ; 7.5 / 5.0`,
`Content-length:`), a blank line and the processed message. It returns a
`SpamResult`; any failure (cannot connect, timeout, an error status, a short
or malformed answer) raises `SpamError`.

With `edit` the content file is replaced by the processed message the
durable way: written to a new file next to it, synced, renamed over the old
one, and the directory synced; a crash leaves the old content or the new,
never a truncated file. Line endings in the processed message are made CRLF,
as the spool requires. Without `edit` the content file is only read.

A message larger than `MAX_SIZE` is not sent (spamc skips such messages
too); the result says so and the message passes unscanned.

The spool may be root's alone (seed 000's privilege model): every spool
access here (opening the content, creating the new file, the rename, the
directory sync) is a root window of its own, and reading, writing and
talking to spamd happen outside the windows, on the open files.
"""

import os
import socket
import time

from ..runtime import process
from .requestclient import describe

# spamc's default limit (its -s option): larger messages are not scanned.
MAX_SIZE = 500 * 1024
USER = "emailrelay"
HEADER_LIMIT = 16384
CHUNK = 65536


class SpamError(Exception):
    """spamd could not be asked or gave no usable answer; str() is the reason."""


class SpamResult:
    """`spam` (bool), `score` (spamd's `Spam:` value, e.g. 'True ; 7.5 / 5.0',
    '' when not scanned) and `skipped` (too big to scan)."""

    def __init__(self, spam, score="", skipped=False):
        self.spam = spam
        self.score = score
        self.skipped = skipped


def check(location, content_path, timeout, edit, max_size=MAX_SIZE):
    """Asks spamd at `location` (a requestclient.Location) about one message."""
    try:
        with process.privileged(group=False):
            f = open(content_path, "rb")
    except OSError as e:
        raise SpamError("cannot read content file: %s" % (e.strerror or e)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > max_size:
            return SpamResult(False, skipped=True)
        try:
            sock = location.connect(timeout)
        except OSError as e:
            raise SpamError("cannot connect to spamd at %s: %s"
                            % (location.display, describe(e))) from None
        deadline = time.monotonic() + timeout
        try:
            return _talk(sock, f, content_path, size, edit, deadline, location.display)
        except OSError as e:
            raise SpamError("spamd at %s: %s" % (location.display, describe(e))) from None
        finally:
            sock.close()


def _talk(sock, f, content_path, size, edit, deadline, display):
    head = ("PROCESS SPAMC/1.4\r\nUser: %s\r\nContent-length: %d\r\n\r\n" % (USER, size)).encode()
    sock.sendall(head)
    while True:
        _settimeout(sock, deadline)
        data = f.read(CHUNK)
        if not data:
            break
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    reader = _Reader(sock, deadline)
    status = reader.line()
    parts = status.split()
    if len(parts) < 2 or not parts[0].startswith(b"SPAMD/") or parts[1] != b"0":
        raise SpamError("spamd at %s: error response: %s" % (display, _printable(status)))
    score = None
    length = None
    while True:
        line = reader.line()
        if not line:
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"spam":
            score = _printable(value.strip())
        elif name == b"content-length":
            if not value.strip().isdigit():
                raise SpamError("spamd at %s: bad content-length" % display)
            length = int(value.strip())
    if score is None or length is None:
        raise SpamError("spamd at %s: incomplete response headers" % display)
    spam = score.lower().startswith("true")
    if edit:
        _replace(content_path, os.fstat(f.fileno()), reader, length)
    else:
        reader.skip(length)
    return SpamResult(spam, score)


def _settimeout(sock, deadline):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise socket.timeout()
    sock.settimeout(remaining)


def _printable(data):
    return "".join(c if c.isprintable() else " " for c in data.decode("utf-8", "replace")).strip()


class _Reader:
    """Buffered reads from spamd within the deadline."""

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()

    def _fill(self):
        _settimeout(self.sock, self.deadline)
        data = self.sock.recv(CHUNK)
        if not data:
            raise SpamError("spamd closed the connection early")
        self.buf += data

    def line(self):
        """One header line without its ending."""
        while b"\n" not in self.buf:
            if len(self.buf) > HEADER_LIMIT:
                raise SpamError("spamd response header too long")
            self._fill()
        i = self.buf.index(b"\n")
        line = bytes(self.buf[:i]).rstrip(b"\r")
        del self.buf[:i + 1]
        return line

    def chunks(self, length):
        """Yields exactly `length` octets of body, in pieces."""
        while length > 0:
            if not self.buf:
                self._fill()
            piece = bytes(self.buf[:length])
            del self.buf[:len(piece)]
            length -= len(piece)
            yield piece

    def skip(self, length):
        for _ in self.chunks(length):
            pass


def _replace(content_path, old, reader, length):
    """Writes the processed message over the content file (`old` its stat), durably."""
    tmp = content_path + ".spamd"
    try:
        with process.privileged(group=False):
            out = open(tmp, "wb")
            # The new file keeps the old one's mode and owners (the spool's
            # group may be what lets the POP server or a filter read it).
            try:
                os.fchmod(out.fileno(), old.st_mode & 0o7777)
                os.fchown(out.fileno(), old.st_uid, old.st_gid)
            except OSError:
                pass
        with out:
            pending_cr = False
            for piece in reader.chunks(length):
                if pending_cr:
                    piece = b"\r" + piece
                pending_cr = piece.endswith(b"\r")
                if pending_cr:
                    piece = piece[:-1]
                out.write(piece.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
            if pending_cr:
                out.write(b"\r")
            out.flush()
            os.fsync(out.fileno())
        with process.privileged(group=False):
            os.rename(tmp, content_path)
    except BaseException:
        try:
            with process.privileged(group=False):
                os.unlink(tmp)
        except OSError:
            pass
        raise
    with process.privileged(group=False):
        fd = os.open(os.path.dirname(os.path.abspath(content_path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
