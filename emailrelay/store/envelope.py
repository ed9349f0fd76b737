"""Envelope files: E-MailRelay's `#2821.8` format, read and written.

An envelope file is a list of `X-MailRelay-<Name>: <value>` lines ending
with `X-MailRelay-End: 1`, CRLF line endings. Whatever follows the `End`
line (the trailer) is kept verbatim: that is where a failure reason is
appended (`X-MailRelay-Reason:` / `X-MailRelay-ReasonCode:`), and where
this version keeps its own state: the retry line (`retry()`) and the RFC
3461 DSN parameters (`dsn()`), which E-MailRelay's reader never sees.

`Envelope.parse()` reads `#2821.8` and the older `#2821.3` ... `#2821.7`
formats: it is strict about the `Format` value (first line) and the `End`
line, lenient about field order, unknown fields and LF-only line endings.
Fields an older format lacks get their defaults. `to_bytes()` always writes
`#2821.8` in E-MailRelay's field order, byte for byte as E-MailRelay does.
"""

import collections

from ..util import xtext

FORMAT = "#2821.8"
KNOWN_FORMATS = ("#2821.3", "#2821.4", "#2821.5", "#2821.6", "#2821.7", FORMAT)
CONTENT_TYPES = ("7bit", "8bit", "binarymime", "unknown")
PREFIX = b"X-MailRelay-"
# Bounds on what is read (a spool written by another program may hold
# anything): the whole file, and one line. A recipient line is at most a few
# hundred octets and a folded certificate line 64.
SIZE_LIMIT = 4 * 1024 * 1024
LINE_LIMIT = 65536
RETRY_PREFIX = PREFIX + b"Retry:"
DSN_PREFIX = PREFIX + b"Dsn-"

Retry = collections.namedtuple("Retry", "count next_time first_time reason")
Retry.__doc__ = """Automatic retry state kept in the trailer (see `Envelope.retry()`).

`count` temporary failures so far, `next_time` the unix time of the next
attempt, `first_time` that of the first failure, `reason` the last one."""


Dsn = collections.namedtuple("Dsn", "ret envid recipients")
Dsn.__doc__ = """A message's RFC 3461 parameters, kept in the trailer (see `Envelope.dsn()`).

`ret` is `FULL`, `HDRS` or ''; `envid` the ENVID value as given (xtext)
or ''; `recipients` maps a recipient address as stored to its (notify,
orcpt) pair: the NOTIFY value upper-cased and the ORCPT value as given,
each '' when the client sent none."""


class EnvelopeError(Exception):
    """An envelope file (or value) that cannot be read or written; says why."""


class Envelope:
    """One message's envelope.

    Attributes (all may be set by keyword in the constructor): `format`,
    `content` (one of CONTENT_TYPES), `from_`, `to_local` and `to_remote`
    (lists), `authentication` (decoded text; written as xtext), `client`
    (the client's IP address, as E-MailRelay writes it),
    `client_certificate` (PEM text or ''), `mail_from_auth_in` and
    `mail_from_auth_out` (raw xtext or ''), `forward_to`,
    `forward_to_address`, `client_account_selector`, `utf8_mailbox_names`
    (bool), `trailer` (bytes after the `End` line).
    """

    _DEFAULTS = (
        ("format", FORMAT), ("content", "7bit"), ("from_", ""), ("to_local", None),
        ("to_remote", None), ("authentication", ""), ("client", ""),
        ("client_certificate", ""), ("mail_from_auth_in", ""), ("mail_from_auth_out", ""),
        ("forward_to", ""), ("forward_to_address", ""), ("client_account_selector", ""),
        ("utf8_mailbox_names", False), ("trailer", b""),
    )

    def __init__(self, **fields):
        for name, default in self._DEFAULTS:
            value = fields.pop(name, default)
            if value is None:
                value = []
            elif isinstance(value, list):
                value = list(value)
            setattr(self, name, value)
        if fields:
            raise TypeError("unknown envelope field(s): %s" % ", ".join(sorted(fields)))

    def __eq__(self, other):
        return isinstance(other, Envelope) and vars(self) == vars(other)

    def __repr__(self):
        return "Envelope(%s)" % ", ".join("%s=%r" % item for item in sorted(vars(self).items()))

    def reasons(self):
        """The failure reasons appended to the trailer, oldest first."""
        out = []
        for line in self.trailer.splitlines():
            if line.startswith(PREFIX + b"Reason:"):
                out.append(line[len(PREFIX) + 7:].strip().decode("utf-8", "replace"))
        return out

    def retry(self):
        """The Retry state from the trailer, or None when it has none.

        The state is one `X-MailRelay-Retry: <count> <next-time>
        <first-time> <reason>` line after the `End` line: E-MailRelay's own
        reader stops at `End` and its tools keep such lines, so a spool with
        retry state is still an E-MailRelay spool.
        """
        state = None
        for line in self.trailer.splitlines():
            if line.startswith(RETRY_PREFIX):
                words = line[len(RETRY_PREFIX):].decode("ascii", "replace").split(None, 3)
                if len(words) >= 3 and all(w.isdigit() for w in words[:3]):
                    state = Retry(int(words[0]), int(words[1]), int(words[2]),
                                  words[3] if len(words) > 3 else "")
        return state

    def set_retry(self, state):
        """Replaces any Retry line in the trailer with `state` (None: removes it)."""
        kept = [line for line in self.trailer.splitlines(True) if not line.startswith(RETRY_PREFIX)]
        if kept and not kept[-1].endswith(b"\n"):
            kept[-1] += b"\r\n"
        if state is not None:
            kept.append(("X-MailRelay-Retry: %d %d %d %s\r\n" % (
                state.count, state.next_time, state.first_time, printable(state.reason))).encode("ascii"))
        self.trailer = b"".join(kept)

    def dsn(self):
        """The DSN parameters from the trailer (a `Dsn`), or None when there are none.

        The lines are `X-MailRelay-Dsn-Ret: FULL|HDRS`, `X-MailRelay-Dsn-Envid:
        <xtext>` and one `X-MailRelay-Dsn-Rcpt: <address as xtext>
        <notify-or-'-'> <orcpt-or-'-'>` per recipient that has a value.
        """
        ret = envid = ""
        recipients = {}
        found = False
        for line in self.trailer.splitlines():
            if not line.startswith(DSN_PREFIX):
                continue
            name, _, value = line[len(DSN_PREFIX):].decode("ascii", "replace").partition(":")
            value = value.strip()
            found = True
            if name == "Ret":
                ret = value
            elif name == "Envid":
                envid = value
            elif name == "Rcpt":
                words = value.split(" ")
                if len(words) == 3:
                    notify, orcpt = (w if w != "-" else "" for w in words[1:])
                    recipients[xtext.decode(words[0])] = (notify, orcpt)
        return Dsn(ret, envid, recipients) if found else None

    def set_dsn(self, dsn):
        """Replaces the DSN lines in the trailer with `dsn` (None or empty: removes them)."""
        kept = [line for line in self.trailer.splitlines(True) if not line.startswith(DSN_PREFIX)]
        if kept and not kept[-1].endswith(b"\n"):
            kept[-1] += b"\r\n"
        lines = []
        if dsn is not None:
            if dsn.ret:
                lines.append("Ret: %s" % dsn.ret)
            if dsn.envid:
                lines.append("Envid: %s" % dsn.envid)
            for address, (notify, orcpt) in dsn.recipients.items():
                if notify or orcpt:
                    lines.append("Rcpt: %s %s %s" % (xtext.encode(address), notify or "-",
                                                     orcpt or "-"))
        for line in lines:
            if any(not " " <= c <= "~" for c in line):
                raise EnvelopeError("invalid DSN value %r" % line)
            kept.append(("X-MailRelay-Dsn-%s\r\n" % line).encode("ascii"))
        self.trailer = b"".join(kept)

    # -- reading

    @classmethod
    def read(cls, path):
        """Reads and parses an envelope file (OSError if it cannot be read).

        Reads at most SIZE_LIMIT octets: a bigger file is an EnvelopeError.
        """
        with open(path, "rb") as f:
            return cls.parse(f.read(SIZE_LIMIT + 1))

    @classmethod
    def parse(cls, data):
        """Parses the bytes of an envelope file; raises EnvelopeError.

        More than SIZE_LIMIT octets, or a line longer than LINE_LIMIT, is an
        error (never unbounded work for a corrupt or hostile file).
        """
        if len(data) > SIZE_LIMIT:
            raise EnvelopeError("envelope file larger than %d octets" % SIZE_LIMIT)
        fields, to_local, to_remote, trailer = _split(data)
        fmt = fields.pop("Format")
        if "From" not in fields:
            raise EnvelopeError("no X-MailRelay-From line")
        count_text = fields.get("ToCount")
        if count_text is None or not count_text.isdigit():
            raise EnvelopeError("missing or invalid X-MailRelay-ToCount")
        if int(count_text) != len(to_local) + len(to_remote):
            raise EnvelopeError("X-MailRelay-ToCount is %s but there are %d recipient lines"
                                % (count_text, len(to_local) + len(to_remote)))
        content = fields.get("Content", "unknown")
        return cls(
            format=fmt,
            content=content if content in CONTENT_TYPES else "unknown",
            from_=fields["From"],
            to_local=to_local,
            to_remote=to_remote,
            authentication=xtext.decode(fields.get("Authentication", "")),
            client=fields.get("Client", ""),
            client_certificate=fields.get("ClientCertificate", ""),
            mail_from_auth_in=fields.get("MailFromAuthIn", ""),
            mail_from_auth_out=fields.get("MailFromAuthOut", ""),
            forward_to=fields.get("ForwardTo", ""),
            forward_to_address=fields.get("ForwardToAddress", ""),
            client_account_selector=fields.get("ClientAccountSelector", ""),
            utf8_mailbox_names=fields.get("Utf8MailboxNames", "0") == "1",
            trailer=trailer,
        )

    # -- writing

    def to_bytes(self):
        """The envelope file: `#2821.8`, CRLF, E-MailRelay's order, then the trailer.

        Raises EnvelopeError if a value holds a line break (which would let
        one field forge another) or the content type is not a known one.
        """
        if self.content not in CONTENT_TYPES:
            raise EnvelopeError("invalid content type %r" % (self.content,))
        lines = [
            ("Format", FORMAT),
            ("Content", self.content),
            ("From", self.from_),
            ("ToCount", str(len(self.to_local) + len(self.to_remote))),
        ]
        lines += [("To-Local", to) for to in self.to_local]
        lines += [("To-Remote", to) for to in self.to_remote]
        lines += [
            ("Authentication", xtext.encode(self.authentication)),
            ("Client", self.client),
            ("ClientCertificate", None),
            ("MailFromAuthIn", self.mail_from_auth_in),
            ("MailFromAuthOut", self.mail_from_auth_out),
            ("ForwardTo", self.forward_to),
            ("ForwardToAddress", self.forward_to_address),
            ("ClientAccountSelector", self.client_account_selector),
            ("Utf8MailboxNames", "1" if self.utf8_mailbox_names else "0"),
            ("End", "1"),
        ]
        out = []
        for name, value in lines:
            if value is None:
                value = _folded(self.client_certificate)
            elif "\r" in value or "\n" in value:
                raise EnvelopeError("line break in envelope field %s" % name)
            out.append("X-MailRelay-%s: %s\r\n" % (name, value))
        return "".join(out).encode("utf-8", "surrogateescape") + bytes(self.trailer)


def reason_lines(reason, code=None):
    """The trailer lines that record a failure, as E-MailRelay appends them.

    The reason is made printable ASCII on one line; the code is written
    only when it is non-zero (`X-MailRelay-ReasonCode:` alone otherwise).
    """
    text = printable(reason)
    code_part = " %d" % int(code) if code else ""
    return ("X-MailRelay-Reason: %s\r\nX-MailRelay-ReasonCode:%s\r\n" % (text, code_part)).encode("ascii")


def printable(text):
    """`text` with anything outside printable ASCII escaped (one safe line)."""
    out = []
    for c in str(text):
        if " " <= c <= "~":
            out.append(c)
        elif c == "\r":
            out.append("\\r")
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x100:
            out.append("\\x%02X" % ord(c))
        else:
            out.append("\\u%04X" % (ord(c) & 0xFFFF))
    return "".join(out)


def _folded(certificate):
    """A PEM certificate folded RFC 2822 style (continuation lines start with a space)."""
    text = certificate.strip().replace("\r", "")
    return text.replace("\n", "\r\n ")


def _split(data):
    """Splits envelope bytes into (fields, to_local, to_remote, trailer).

    Continuation lines (leading space or tab) are joined to the previous
    value with a newline, as E-MailRelay unfolds them.
    """
    data = bytes(data)
    fields = {}
    to_local = []
    to_remote = []
    pos = 0
    last = None
    first = True
    while True:
        if pos >= len(data):
            raise EnvelopeError("no X-MailRelay-End line")
        nl = data.find(b"\n", pos, pos + LINE_LIMIT + 1)
        if nl < 0 and len(data) - pos > LINE_LIMIT:
            raise EnvelopeError("envelope line longer than %d octets" % LINE_LIMIT)
        end = len(data) if nl < 0 else nl + 1
        line = data[pos:end].rstrip(b"\n")
        if line.endswith(b"\r"):
            line = line[:-1]
        pos = end
        if line[:1] in (b" ", b"\t") and last is not None:
            if last[0] in ("To-Local", "To-Remote"):
                raise EnvelopeError("folded recipient line")
            fields[last[0]] = fields[last[0]] + "\n" + _text(line[1:]).rstrip()
            continue
        if not line.startswith(PREFIX) or b":" not in line:
            raise EnvelopeError("bad envelope line %r" % (_text(line[:60]),))
        name_b, _, value_b = line[len(PREFIX):].partition(b":")
        name = _text(name_b)
        value = _text(value_b).strip(" \t")
        if first:
            if name != "Format":
                raise EnvelopeError("envelope does not start with X-MailRelay-Format")
            if value not in KNOWN_FORMATS:
                raise EnvelopeError("unknown envelope format %r" % value)
            first = False
        if name == "End":
            return fields, to_local, to_remote, data[pos:]
        if name == "To-Local":
            to_local.append(value)
        elif name == "To-Remote":
            to_remote.append(value)
        else:
            fields[name] = value
        last = (name,)


def _text(raw):
    return raw.decode("utf-8", "surrogateescape")
