"""emailrelay-sendmail: a sendmail command for cron, mailx and scripts.

Takes the sendmail options those programs use and stores the message in
the spool exactly as emailrelay-submit does (same code, same durable
commit), for the relay to forward:

    -t          recipients also from the To:, Cc: and Bcc: headers; Bcc: is
                removed from the stored message
    -i, -oi     a line holding a single '.' does not end the message
    -f <addr>   the envelope sender (also -f<addr>, -r <addr>)
    -F <name>   the full name for a From: header that the message lacks
    -bm         read a message and deliver it (the default and only mode)
    -odi, -odb, -odq, -oem, -oee, -oep, -oeq, -oew, -v   accepted and ignored
    --          the end of the options: the rest are recipients

Without -f the sender is the From: header's address, else the invoking
user at this host. `--spool-dir <dir>` (or $EMAILRELAY_SPOOL) names the
spool; the default is /var/spool/emailrelay. Exit statuses are sendmail's:
0 stored, 64 a usage error, 65 bad input, 73 the spool cannot be written.
"""

import os
import pwd
import socket
import sys
from email.utils import getaddresses

from ..store import envelope, spool
from . import submit

EX_OK, EX_USAGE, EX_DATAERR, EX_CANTCREAT = 0, 64, 65, 73
IGNORED = {"-odi", "-odb", "-odq", "-odd", "-oem", "-oee", "-oep", "-oeq", "-oew", "-v",
           "-bm", "-m", "-om", "-oo", "-U"}
RECIPIENT_HEADERS = ("to", "cc", "bcc")


class UsageError(Exception):
    """A command line sendmail would not take from us."""


class Options:
    """The parsed command line: attributes as the module docstring lists."""

    def __init__(self):
        self.from_ = None
        self.full_name = None
        self.headers_recipients = False
        self.dot_ends = True
        self.spool_dir = os.environ.get("EMAILRELAY_SPOOL") or submit.DEFAULT_SPOOL_DIR
        self.recipients = []


def parse(argv):
    """Parses sendmail's command line; raises UsageError."""
    opts = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts.recipients += args
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
        elif arg == "-t":
            opts.headers_recipients = True
        elif arg in ("-i", "-oi"):
            opts.dot_ends = False
        elif arg[:2] in ("-f", "-r", "-F") or arg == "--spool-dir":
            name = arg if arg == "--spool-dir" else arg[:2]
            value = arg[2:] if name != arg else None
            if not value:
                if not args:
                    raise UsageError("%s needs a value" % name)
                value = args.pop(0)
            if name == "-F":
                opts.full_name = value
            elif name == "--spool-dir":
                opts.spool_dir = value
            else:
                opts.from_ = value
        elif arg in IGNORED:
            continue
        elif arg.startswith("-b"):
            raise UsageError("mode %s is not supported: only -bm (deliver a message)" % arg)
        else:
            raise UsageError("unknown option %s" % arg)
    if not opts.recipients and not opts.headers_recipients:
        raise UsageError("no recipients (give addresses, or -t to read them from the message)")
    return opts


class _HeaderWriter(submit._Writer):
    """The submit writer, also keeping every To:/Cc:/Bcc: value (with -t)."""

    def __init__(self, message, synthetic, drop):
        super().__init__(message, synthetic, drop)
        self.recipient_values = []
        self._collecting = False

    def line(self, text):
        if self.in_headers and text:
            if text[:1] in (b" ", b"\t"):
                if self._collecting:
                    self.recipient_values[-1] += b" " + text.strip()
            elif submit._HEADER.match(text):
                name, _, value = text.partition(b":")
                self._collecting = name.lower().decode("ascii") in RECIPIENT_HEADERS
                if self._collecting:
                    self.recipient_values.append(value.strip())
            else:
                self._collecting = False
        super().line(text)


def _default_sender():
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = "uid%d" % os.getuid()
    return "%s@%s" % (user, socket.getfqdn())


def _addresses(values):
    texts = [v.decode("utf-8", "replace") for v in values]
    return [addr for _, addr in getaddresses(texts) if addr]


def store(opts, stdin):
    """Stores the message read from `stdin`; returns the NewMessage."""
    for addr in [opts.from_ or ""] + opts.recipients:
        if "\r" in addr or "\n" in addr:
            raise submit.SubmitError("line break in an address")
    if not os.path.isdir(opts.spool_dir):
        raise spool.SpoolError("spool directory does not exist: %s" % opts.spool_dir)
    drop = {"bcc"} if opts.headers_recipients else set()

    def synthetic(seen):
        extra = []
        if "from" not in seen:
            sender = opts.from_ or _default_sender()
            name = opts.full_name
            extra.append(("From: \"%s\" <%s>" % (name.replace('"', "'"), sender) if name
                          else "From: %s" % sender).encode("utf-8"))
        return extra + submit._synthetic(_NoExtras, "", [])(seen)

    def envelope_for(writer):
        recipients = list(opts.recipients)
        if opts.headers_recipients:
            recipients += [a for a in _addresses(writer.recipient_values) if a not in recipients]
        if not recipients:
            raise submit.SubmitError("no recipients in the message's To:, Cc: or Bcc: headers")
        sender = opts.from_ or (submit._header_address(writer.seen["from"])
                                if "from" in writer.seen else _default_sender())
        return envelope.Envelope(
            content="8bit" if writer.eight_bit else "7bit",
            from_=sender, to_remote=recipients, client="127.0.0.1:0",
            utf8_mailbox_names=not all(a.isascii() for a in [sender] + recipients))
    return submit.store(opts.spool_dir, lambda message: _HeaderWriter(message, synthetic, drop),
                        lambda writer: submit._copy_input(stdin, writer, opts.dot_ends),
                        envelope_for)


class _NoExtras:
    """submit's header options, all off: only Date: and Message-ID: are added."""

    content_from = False
    content_to = False
    content_message_id = None


def run(argv=None):
    """Entry point; returns sendmail's exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(argv)
    except UsageError as e:
        sys.stderr.write("emailrelay-sendmail: usage error: %s\n" % e)
        return EX_USAGE
    try:
        store(opts, sys.stdin.buffer)
    except (submit.SubmitError, envelope.EnvelopeError) as e:
        sys.stderr.write("emailrelay-sendmail: error: %s\n" % e)
        return EX_DATAERR
    except (spool.SpoolError, OSError) as e:
        text = getattr(e, "strerror", None) or str(e)
        filename = getattr(e, "filename", None)
        sys.stderr.write("emailrelay-sendmail: error: %s%s\n"
                         % (text, ": %s" % filename if filename else ""))
        return EX_CANTCREAT
    return EX_OK
