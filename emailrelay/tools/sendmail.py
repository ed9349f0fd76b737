"""emailrelay-sendmail: a sendmail command for cron, mailx and scripts.

Takes the sendmail options those programs use. A user who may write the
spool (root, or the daemon's group) has the message stored in it exactly
as emailrelay-submit does (same code, same durable commit), for the relay
to forward; anyone else hands it to the running daemon over SMTP on its
loopback address (see `local_daemon`), which needs no set-group-id
program:

    -t          recipients also from the To:, Cc: and Bcc: headers; Bcc: is
                removed from the stored message
    -i, -oi     a line holding a single '.' does not end the message
    -f <addr>   the envelope sender (also -f<addr>, -r <addr>)
    -F <name>   the full name for a From: header that the message lacks
    -bm         read a message and deliver it (the default)
    -bp         list the queue (also when run as `mailq`)
    -bs         speak SMTP on the standard input and output
    -q          forward the queue now
    -C <file>   the relay's configuration file
    -odi, -odb, -odq, -oem, -oee, -oep, -oeq, -oew, -v   accepted and ignored
    --          the end of the options: the rest are recipients

The relay's configuration file (-C, else $EMAILRELAY_CONF, else
/etc/emailrelay.conf or /usr/local/etc/emailrelay.conf) gives the spool
directory, the domain and the daemon's SMTP and admin addresses. An
address without a domain (`root`) gets the relay's --domain, as does the
default sender, the invoking user. `--spool-dir <dir>` (or
$EMAILRELAY_SPOOL) overrides the spool directory. Exit statuses are
sendmail's: 0 done, 64 a usage error, 65 bad input, 69 the daemon refused
the message, 73 the spool cannot be written, 75 the daemon cannot be
reached (try again later), 77 the queue cannot be read, 78 a bad
configuration file.
"""

import os
import pwd
import sys
from email.utils import getaddresses

from ..main import run as run_relay
from ..store import envelope, spool, spool_listing
from . import local_daemon, submit

EX_OK, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE = 0, 64, 65, 69
EX_CANTCREAT, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 73, 75, 77, 78
IGNORED = {"-odi", "-odb", "-odq", "-odd", "-oem", "-oee", "-oep", "-oeq", "-oew", "-v",
           "-m", "-om", "-oo", "-U"}
MODES = {"-bm": "deliver", "-bp": "list", "-bs": "smtp", "-q": "flush"}
RECIPIENT_HEADERS = ("to", "cc", "bcc")
USAGE = """usage: emailrelay-sendmail [-t] [-i] [-f sender] [-F full-name] [-C config] [--] [recipient ...]
       emailrelay-sendmail -bp | -bs | -q [-C config]
Reads a message from the standard input and hands it to emailrelay: into the
spool when this user may write it, else to the running daemon over SMTP.
  -t         recipients also from To:, Cc: and Bcc: (Bcc: is removed)
  -i, -oi    a line holding a single '.' does not end the message
  -f sender  the envelope sender (also -r); default the invoking user
  -F name    the full name for an added From: header
  -bm        deliver a message (the default)
  -bp        list the queue (as mailq does)
  -bs        SMTP on the standard input and output
  -q         forward the queue now
  -C file    the relay's configuration file (default $EMAILRELAY_CONF, else
             /etc/emailrelay.conf or /usr/local/etc/emailrelay.conf)
  --spool-dir dir   the spool directory (default $EMAILRELAY_SPOOL, else the
             configuration's spool-dir)
Addresses without a domain get the relay's --domain. See emailrelay-sendmail(8).
"""


class UsageError(Exception):
    """A command line sendmail would not take from us."""


class Options:
    """The parsed command line: attributes as the module docstring lists."""

    def __init__(self):
        self.mode = "deliver"
        self.help = False
        self.from_ = None
        self.full_name = None
        self.headers_recipients = False
        self.dot_ends = True
        self.config = None
        self.spool_dir = os.environ.get("EMAILRELAY_SPOOL") or None
        self.recipients = []


def parse(argv, program="sendmail"):
    """Parses sendmail's command line; raises UsageError.

    Run as `mailq` (by that name), the mode is -bp.
    """
    opts = Options()
    if program == "mailq":
        opts.mode = "list"
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts.recipients += args
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
        elif arg in ("--help", "-h"):
            opts.help = True
        elif arg == "-t":
            opts.headers_recipients = True
        elif arg in ("-i", "-oi"):
            opts.dot_ends = False
        elif arg[:2] in ("-f", "-r", "-F", "-C") or arg == "--spool-dir":
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
            elif name == "-C":
                opts.config = value
            else:
                opts.from_ = value
        elif arg in MODES:
            opts.mode = MODES[arg]
        elif arg in IGNORED:
            continue
        elif arg.startswith("-q"):
            raise UsageError("%s: a queue interval is not supported: run emailrelay with --poll"
                             % arg)
        elif arg.startswith("-b"):
            raise UsageError("mode %s is not supported: only -bm, -bp, -bs and -q" % arg)
        else:
            raise UsageError("unknown option %s" % arg)
    if opts.mode == "deliver" and not opts.help and not opts.recipients \
            and not opts.headers_recipients:
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


class _Stream:
    """The writer's `message` when the daemon takes the message over SMTP.

    The headers are held until they end (the recipients of -t are in
    them); then `open(transaction)` sends them and the rest streams
    through.
    """

    def __init__(self):
        self._held = []
        self.transaction = None

    def write(self, data):
        if self.transaction is None:
            self._held.append(data)
        else:
            self.transaction.write(data)

    def open(self, transaction):
        self.transaction = transaction
        held, self._held = self._held, []
        for data in held:
            transaction.write(data)


class _StreamWriter(_HeaderWriter):
    """A header writer that starts the SMTP transaction once the headers are complete."""

    def __init__(self, message, synthetic, drop, start):
        super().__init__(message, synthetic, drop)
        self._start = start

    def end_headers(self):
        if self.in_headers:
            super().end_headers()
            self._start(self)


def _user():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return "uid%d" % os.getuid()


def _qualify(address, domain):
    """`address` with the relay's domain when it has none (`root` -> `root@domain`)."""
    return address if "@" in address or not address else "%s@%s" % (address, domain)


def _addresses(values):
    texts = [v.decode("utf-8", "replace") for v in values]
    return [addr for _, addr in getaddresses(texts) if addr]


class _Message:
    """One message of the deliver mode: its header handling and envelope."""

    def __init__(self, opts, domain):
        for addr in [opts.from_ or ""] + opts.recipients:
            if "\r" in addr or "\n" in addr:
                raise submit.SubmitError("line break in an address")
        self.opts = opts
        self.domain = domain
        self.drop = {"bcc"} if opts.headers_recipients else set()
        self.default_sender = "%s@%s" % (_user(), domain)

    def synthetic(self, seen):
        """The headers to add: From: when missing, then submit's Date: and Message-ID:."""
        extra = []
        if "from" not in seen:
            sender = _qualify(self.opts.from_, self.domain) if self.opts.from_ else self.default_sender
            name = self.opts.full_name
            extra.append(("From: \"%s\" <%s>" % (name.replace('"', "'"), sender) if name
                          else "From: %s" % sender).encode("utf-8"))
        return extra + submit._synthetic(_Extras(self.domain), "", [])(seen)

    def sender(self, writer):
        if self.opts.from_:
            return _qualify(self.opts.from_, self.domain)
        if "from" in writer.seen:
            return _qualify(submit._header_address(writer.seen["from"]), self.domain)
        return self.default_sender

    def recipients(self, writer):
        found = list(self.opts.recipients)
        if self.opts.headers_recipients:
            found += [a for a in _addresses(writer.recipient_values) if a not in found]
        found = [_qualify(a, self.domain) for a in found]
        if not found:
            raise submit.SubmitError("no recipients in the message's To:, Cc: or Bcc: headers")
        return found

    def envelope(self, writer):
        sender, recipients = self.sender(writer), self.recipients(writer)
        return envelope.Envelope(
            content="8bit" if writer.eight_bit else "7bit",
            from_=sender, to_remote=recipients, client="127.0.0.1",
            utf8_mailbox_names=not all(a.isascii() for a in [sender] + recipients))


class _Extras:
    """submit's header options for sendmail: only Date: and Message-ID: are added,
    the Message-ID: in the relay's domain."""

    content_from = False
    content_to = False

    def __init__(self, domain):
        self.content_message_id = domain


def store(opts, stdin, domain):
    """Stores the message read from `stdin` in the spool; returns the NewMessage.

    Addresses without a domain get `domain`."""
    message = _Message(opts, domain)
    spool_dir = opts.spool_dir or submit.DEFAULT_SPOOL_DIR
    if not os.path.isdir(spool_dir):
        raise spool.SpoolError("spool directory does not exist: %s" % spool_dir)
    return submit.store(spool_dir,
                        lambda m: _HeaderWriter(m, message.synthetic, message.drop),
                        lambda writer: submit._copy_input(stdin, writer, opts.dot_ends),
                        message.envelope)


def hand_over(opts, stdin, site):
    """Gives the message read from `stdin` to the daemon over SMTP (see local_daemon)."""
    message = _Message(opts, site.domain)
    stream = _Stream()

    def start(writer):
        # The headers are complete: the envelope is known, the transaction
        # starts, and the daemon reads the rest as it comes.
        stream.open(site.begin(message.sender(writer), message.recipients(writer)))

    writer = _StreamWriter(stream, message.synthetic, message.drop, start)
    try:
        submit._copy_input(stdin, writer, opts.dot_ends)
        writer.end_headers()
        stream.transaction.end()
    finally:
        if stream.transaction is not None:
            stream.transaction.close()


def _writable(directory):
    return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)


def _readable(directory):
    return os.path.isdir(directory) and os.access(directory, os.R_OK | os.X_OK)


def _deliver(opts, site):
    spool_dir = opts.spool_dir or site.spool_dir
    # No spool at all: the relay is not set up as its configuration says.
    if opts.spool_dir or not os.path.isdir(spool_dir) or _writable(spool_dir):
        opts.spool_dir = spool_dir
        store(opts, sys.stdin.buffer, site.domain)
    else:
        hand_over(opts, sys.stdin.buffer, site)
    return EX_OK


def _list(opts, site):
    """-bp, mailq: the spool_listing lines, from the spool or the admin port."""
    spool_dir = opts.spool_dir or site.spool_dir
    if _readable(spool_dir):
        lines = [spool_listing.line(e) for e in spool_listing.entries(spool.Spool(spool_dir))]
        text = "\n".join(lines) + "\n" if lines else ""
    elif site.admin is not None:
        text = site.admin_command("list")
        text = "" if text.strip() == "<none>" else text
    else:
        _error("cannot read the spool %s (run as root or a member of its group, or give "
               "the relay an admin port for mailq)" % spool_dir)
        return EX_NOPERM
    sys.stdout.write(text or "Mail queue is empty\n")
    return EX_OK


def _flush(opts, site):
    """-q: the daemon forwards now (ETRN); with no daemon, root forwards itself."""
    try:
        print(site.etrn())
        return EX_OK
    except local_daemon.SiteError as e:
        spool_dir = opts.spool_dir or site.spool_dir
        if not (site.forward_to and _writable(spool_dir)):
            raise
        unreachable = e
    print("emailrelay-sendmail: %s: forwarding the spool itself" % unreachable)
    return run_relay(["--as-client", site.forward_to, "--spool-dir", spool_dir,
                      "--domain", site.domain])


def _smtp(opts, site):
    """-bs: an SMTP session on stdin/stdout, with the daemon (or, for root with no
    daemon running, stored here as emailrelay --inetd stores)."""
    try:
        site.relay_session(sys.stdin.fileno(), sys.stdout.fileno())
        return EX_OK
    except local_daemon.SiteError:
        spool_dir = opts.spool_dir or site.spool_dir
        if not _writable(spool_dir):
            raise
    return run_relay(["--inetd", "--test-address", "[127.0.0.1]", "--spool-dir", spool_dir,
                      "--domain", site.domain])


def _error(text):
    sys.stderr.write("emailrelay-sendmail: error: %s\n" % text)


def run(argv=None):
    """Entry point; returns sendmail's exit status."""
    program = os.path.basename(sys.argv[0] or "sendmail")
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(argv, program)
    except UsageError as e:
        sys.stderr.write("emailrelay-sendmail: usage error: %s\n" % e)
        sys.stderr.write("emailrelay-sendmail: try --help for more information\n")
        return EX_USAGE
    if opts.help:
        sys.stdout.write(USAGE)
        return EX_OK
    try:
        site = local_daemon.Site.load(local_daemon.find_config(opts.config))
    except local_daemon.SiteError as e:
        _error("configuration file %s" % e)
        return EX_CONFIG
    mode = {"deliver": _deliver, "list": _list, "flush": _flush, "smtp": _smtp}[opts.mode]
    try:
        return mode(opts, site)
    except (submit.SubmitError, envelope.EnvelopeError) as e:
        _error(e)
        return EX_DATAERR
    except local_daemon.Refused as e:
        _error("the emailrelay daemon refused %s: %s"
               % ("the message" if opts.mode == "deliver" else "-q", e))
        return EX_TEMPFAIL if 400 <= e.code < 500 else EX_UNAVAILABLE
    except local_daemon.SiteError as e:
        _error("%s (this user cannot write the spool %s, so the message goes to the "
               "running daemon)" % (e, opts.spool_dir or site.spool_dir)
               if opts.mode == "deliver" else e)
        return EX_TEMPFAIL
    except (spool.SpoolError, OSError) as e:
        text = getattr(e, "strerror", None) or str(e)
        filename = getattr(e, "filename", None)
        _error("%s%s" % (text, ": %s" % filename if filename else ""))
        return EX_CANTCREAT
