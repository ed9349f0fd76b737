"""emailrelay-submit: puts a message straight into the spool directory.

Works a bit like sendmail: the envelope recipients are the arguments, the
message (headers and body) is read from the standard input or
`--input-file` up to the end or a line holding a single dot; the envelope
sender is `--from`, else the address in the message's `From:` header, else
`anonymous`.

The message is streamed to the spool (memory does not grow with its size),
line endings become CRLF, and `Date:` and `Message-ID:` headers are added
when missing. It is committed exactly as the server commits a message
(content and envelope fsync'd, renamed, directory fsync'd), so it is safe
while the server runs. On any failure nothing is left in the spool and the
exit status is 1.
"""

import argparse
import base64
import os
import re
import socket
import sys
from email.utils import formatdate, make_msgid, parseaddr

from ..store import envelope, spool
from ..util import xtext
from . import filter_copy

DEFAULT_SPOOL_DIR = "/var/spool/emailrelay"
VERSION = "2.0"
CHUNK = 1 << 16
_HEADER = re.compile(rb"^[!-9;-~]+:")


class SubmitError(Exception):
    """A problem with the command line or the input, reported in one line."""


def _parser():
    p = argparse.ArgumentParser(
        prog="emailrelay-submit",
        usage="%(prog)s [options] <to-address> [<to-address> ...]",
        description="Reads an e-mail message from the standard input (or --input-file) "
                    "and stores it in the E-MailRelay spool directory.",
        epilog="Input ends at end-of-file or at a line holding a single '.'. "
               "Date: and Message-ID: headers are added when missing.")
    p.add_argument("-f", "--from", dest="from_", metavar="<name>", help="sets the envelope sender")
    p.add_argument("-s", "--spool-dir", metavar="<dir>", default=DEFAULT_SPOOL_DIR,
                   help="specifies the spool directory (default %s)" % DEFAULT_SPOOL_DIR)
    p.add_argument("-x", "--input-file", metavar="<file>",
                   help="reads the message from this file instead of the standard input")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="prints the full path of the created content file")
    p.add_argument("-n", "--filename", action="store_true",
                   help="prints the name of the created content file")
    p.add_argument("-d", "--content-date", action="store_true",
                   help="adds a Date: header if there is none (always done)")
    p.add_argument("-I", "--content-message-id", nargs="?", const="", metavar="<domain-part>",
                   help="adds a Message-ID: header if there is none (always done); sets its "
                        "domain part (default: this host's name)")
    p.add_argument("-F", "--content-from", action="store_true",
                   help="adds a From: header with the envelope sender, replacing From:/Sender:")
    p.add_argument("-t", "--content-to", action="store_true",
                   help="adds a To: header with the envelope recipients, replacing To:/Cc:/Bcc:")
    p.add_argument("-c", "--copy", action="store_true",
                   help="copies the envelope into all sub-directories of the spool directory "
                        "(as emailrelay-filter-copy does)")
    p.add_argument("--to", action="append", default=[], metavar="<address>",
                   help="adds an envelope recipient (as do trailing arguments)")
    p.add_argument("-a", "--auth", default="", metavar="<name>",
                   help="sets the envelope authentication value")
    p.add_argument("-i", "--from-auth-in", metavar="<name>",
                   help="sets the envelope MailFromAuthIn value")
    p.add_argument("-o", "--from-auth-out", metavar="<name>",
                   help="sets the envelope MailFromAuthOut value")
    p.add_argument("-B", "--body", action="store_true",
                   help="treats the input as body text with no headers")
    p.add_argument("-C", "--content", action="append", default=[], metavar="<base64>",
                   help="adds a line of content (base64); the first blank line ends the headers")
    p.add_argument("-N", "--no-stdin", action="store_true", help="ignores the standard input")
    p.add_argument("-V", "--version", action="version", version=VERSION)
    p.add_argument("recipients", nargs="*", metavar="<to-address>", help=argparse.SUPPRESS)
    return p


class _Writer:
    """Writes the content: header handling, CRLF line endings, 8-bit detection."""

    def __init__(self, message, synthetic, drop):
        self.message = message
        self.synthetic = synthetic  # callable(seen) -> header lines to add
        self.drop = drop  # lower-case header names to leave out
        self.in_headers = True
        self.seen = {}  # lower-case header name -> first value (bytes)
        self.dropping = False
        self.last_name = None
        self.eight_bit = False
        self.line_start = True
        self.done = False

    def _out(self, data):
        if not self.eight_bit and not data.isascii():
            self.eight_bit = True
        self.message.write(data)

    def end_headers(self):
        if self.in_headers:
            self.in_headers = False
            for line in self.synthetic(self.seen):
                self._out(line + b"\r\n")
            self._out(b"\r\n")

    def line(self, text):
        """One complete line, without its line ending."""
        if self.in_headers:
            if text == b"":
                self.end_headers()
                return
            if text[:1] in (b" ", b"\t") and self.last_name is not None:
                if not self.dropping:
                    self._out(text + b"\r\n")
                return
            if _HEADER.match(text):
                name, _, value = text.partition(b":")
                self.last_name = name.lower().decode("ascii")
                self.seen.setdefault(self.last_name, value.strip())
                self.dropping = self.last_name in self.drop
                if not self.dropping:
                    self._out(text + b"\r\n")
                return
            self.end_headers()
        self._out(text + b"\r\n")

    def fragment(self, data):
        """Part of an overlong line (no line ending yet)."""
        self.end_headers()
        self._out(data)


def _copy_input(stream, writer, dot_ends=True):
    """Streams `stream` into `writer`, stopping at EOF or (with `dot_ends`) a '.' line.

    Lines are read in pieces of at most CHUNK bytes, so an overlong line
    never sits in memory whole.
    """
    pending = b""
    at_start = True
    while True:
        raw = stream.readline(CHUNK)
        if not raw:
            break
        piece = pending + raw
        pending = b""
        # readline() stops short without a LF only at end of input.
        if piece.endswith(b"\n") or len(raw) < CHUNK:
            text = piece[:-1] if piece.endswith(b"\n") else piece
            if text.endswith(b"\r"):
                text = text[:-1]
            if dot_ends and at_start and text == b".":
                return
            writer.line(text)
            at_start = True
        else:
            if piece.endswith(b"\r"):
                # The LF may come in the next piece: keep the CR with it.
                piece, pending = piece[:-1], b"\r"
            if piece:
                writer.fragment(piece)
            at_start = False
    if not at_start:
        writer.line(b"")


def _header_address(value):
    text = value.decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    return parseaddr(text)[1] or text.strip()


def _synthetic(args, from_addr, recipients):
    def headers(seen):
        out = []
        if args.content_from:
            out.append(b"From: " + from_addr.encode("utf-8"))
        if args.content_to:
            out.append(b"To: " + ", ".join(recipients).encode("utf-8"))
        if "date" not in seen:
            out.append(b"Date: " + formatdate(localtime=True).encode("ascii"))
        if "message-id" not in seen:
            domain = args.content_message_id or socket.getfqdn() or "localhost"
            out.append(b"Message-ID: " + make_msgid(domain=domain).encode("utf-8"))
        return out
    return headers


def _recipients(args):
    out = []
    for to in list(args.to) + list(args.recipients):
        to = to.strip(" \t\r\n")
        if to.startswith("\\"):
            to = to[1:]
        if not to:
            raise SubmitError("empty recipient address")
        if "\r" in to or "\n" in to:
            raise SubmitError("invalid recipient address")
        out.append(to)
    if not out:
        raise SubmitError("no recipient addresses: usage: emailrelay-submit [options] "
                          "<to-address> [<to-address> ...]")
    return out


def _auth_value(value):
    if value is None:
        return ""
    return xtext.encode(value) if value else "<>"


def _content_lines(args):
    """The --content lines (decoded) split into (header lines, body lines)."""
    head, body = [], []
    target = head
    for part in args.content:
        try:
            line = base64.b64decode(part, validate=True) if len(part) > 1 else b""
        except ValueError:
            raise SubmitError("--content value is not base64: %r" % part) from None
        if target is head and line == b"":
            target = body
            continue
        target.append(line.rstrip(b"\r\n"))
    return head, body, target is body


def store(spool_dir, make_writer, feed, envelope_for):
    """Stores one message in the spool the durable way; returns the NewMessage.

    `make_writer(message)` returns the content writer (a `_Writer`),
    `feed(writer)` streams the content into it and `envelope_for(writer)`
    returns the Envelope once the content is complete. The message is
    committed as the server commits one; on any failure it is abandoned
    (nothing is left in the spool) and the exception propagates.
    """
    message = spool.Spool(spool_dir).new_message()
    try:
        writer = make_writer(message)
        feed(writer)
        writer.end_headers()
        env = envelope_for(writer)
        message.commit_content()
        message.write_envelope(env)
        message.finish(env)
    except BaseException:
        message.abandon()
        raise
    return message


def submit(args, stdin):
    """Stores the message described by the parsed arguments; returns the NewMessage."""
    recipients = _recipients(args)
    for addr in [args.from_ or ""] + recipients:
        if "\r" in addr or "\n" in addr:
            raise SubmitError("line break in an address")
    if not os.path.isdir(args.spool_dir):
        raise spool.SpoolError("spool directory does not exist: %s" % args.spool_dir)
    head, body, head_ended = _content_lines(args)
    source = None
    if args.input_file:
        try:
            source = open(args.input_file, "rb")
        except OSError as e:
            raise SubmitError("cannot read %s: %s" % (args.input_file, e.strerror)) from None
    elif not args.no_stdin:
        source = stdin
    drop = set()
    if args.content_from:
        drop |= {"from", "sender"}
    if args.content_to:
        drop |= {"to", "cc", "bcc"}

    def make_writer(message):
        return _Writer(message, _synthetic(args, args.from_ or "anonymous", recipients), drop)

    def feed(writer):
        for line in head:
            writer.line(line)
        if head_ended or args.body:
            writer.end_headers()
        for line in body:
            writer.line(line)
        if source is not None:
            _copy_input(source, writer)

    def envelope_for(writer):
        from_addr = args.from_ or ""
        if not from_addr:
            from_addr = _header_address(writer.seen["from"]) if "from" in writer.seen else ""
        return envelope.Envelope(
            content="8bit" if writer.eight_bit else "7bit",
            from_=from_addr or "anonymous",
            to_remote=recipients,
            authentication=args.auth,
            client="127.0.0.1",
            mail_from_auth_in=_auth_value(args.from_auth_in),
            mail_from_auth_out=_auth_value(args.from_auth_out),
            utf8_mailbox_names=not all(a.isascii() for a in [from_addr] + recipients),
        )
    try:
        return store(args.spool_dir, make_writer, feed, envelope_for)
    finally:
        if source is not None and source is not stdin:
            source.close()


def run(argv=None):
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        message = submit(args, sys.stdin.buffer)
        if args.copy:
            main_envelope = message.spool.path(message.id, spool.READY)
            dirs = filter_copy.user_directories(message.spool.directory)
            if dirs and not filter_copy.copy_envelope(main_envelope, message.id + spool.READY, dirs):
                os.unlink(main_envelope)
    except (SubmitError, spool.SpoolError, envelope.EnvelopeError) as e:
        print("emailrelay-submit: error: %s" % e, file=sys.stderr)
        return 1
    except OSError as e:
        # A user who may not write the spool needs to know the way that works.
        hint = (" (only root or the spool's group may write it: other users can send with "
                "emailrelay-sendmail, which hands the message to the running daemon)"
                if isinstance(e, PermissionError) else "")
        where = ": %s" % e.filename if e.filename else ""
        print("emailrelay-submit: error: %s%s%s" % (e.strerror or e, where, hint), file=sys.stderr)
        return 1
    if args.verbose:
        print(message.content_path)
    elif args.filename:
        print(os.path.basename(message.content_path))
    return 0
