"""MAIL FROM and RCPT TO as the SMTP server takes them: E-MailRelay's ServerParser.

`mail(arg, features, size_limit)` and `rcpt_path` / `rcpt_params` read a
command's argument (`features` is --server-smtp-config, as
`smtp_settings.SmtpSettings.features` has it) and return what the session
keeps, or raise `Refused` with the reply, in the order the checks are
made: the first problem found is the one replied to. Nothing here replies, logs or keeps
state; `smtp_syntax` does the syntax itself.
"""

from typing import NamedTuple

from ..util import smtp_syntax

TOO_BIG = "552 5.3.4 message size exceeds fixed maximum message size"
_BODIES = {"7BIT": "7bit", "8BITMIME": "8bit", "BINARYMIME": "binarymime"}


class Refused(Exception):
    """A command refused with `reply`; `bad` says whether it counts as a bad command."""

    def __init__(self, reply, bad=True):
        super().__init__(reply)
        self.reply = reply
        self.bad = bad


class Mail(NamedTuple):
    """What MAIL FROM gave: `address` as stored (A-labels with alabels),
    `body` ("7bit", "8bit" or "binarymime"), `ret` and `envid` (RFC 3461,
    '' when not given or without DSN), `smtputf8` (SMTPUTF8 given, or a
    non-ASCII address kept) and `auth` (AUTH= as given, xtext; '' if none)."""

    address: str
    body: str
    ret: str
    envid: str
    smtputf8: bool
    auth: str


def mail(arg, features, size_limit):
    """The `Mail` of a MAIL command's argument (`FROM:<path> params`); raises Refused.

    A SIZE over `size_limit` (0: none) is refused with TOO_BIG, not as a bad
    command. Parameters nobody here understands are ignored, as E-MailRelay
    ignores them (RET= and ENVID= too when DSN is switched off).
    """
    if arg[:5].upper() != "FROM:":
        raise Refused("553 5.5.2 mailbox name not allowed: invalid mail-from command")
    try:
        address, rest = smtp_syntax.parse_path(arg[5:], allow_empty=True,
                                               strict=features["strictparsing"])
    except ValueError as e:
        raise Refused("553 5.1.7 mailbox name not allowed: %s" % e) from None
    params = smtp_syntax.parse_params(rest)
    body = "7bit"
    ret = envid = ""
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit():
                raise Refused("501 5.5.4 invalid argument")
            if size_limit and int(value) > size_limit:
                raise Refused(TOO_BIG, bad=False)
        elif key == "BODY":
            body = _BODIES.get((value or "").upper())
            if body is None:
                raise Refused("501 5.5.4 invalid argument")
        elif key in ("RET", "ENVID") and features["dsn"]:
            try:
                if key == "RET":
                    ret = smtp_syntax.dsn_ret(value)
                else:
                    envid = smtp_syntax.dsn_envid(value)
            except ValueError as e:
                raise Refused("501 5.5.4 %s" % e) from None
    smtputf8 = "SMTPUTF8" in params
    address = mailbox(address, smtputf8, features)
    return Mail(address, body, ret, envid, smtputf8 or not address.isascii(),
                params.get("AUTH") or "")


def rcpt_path(arg, features):
    """(address, the parameters' text) of a RCPT command's argument; raises Refused."""
    if arg[:3].upper() != "TO:":
        raise Refused("550 5.5.2 invalid rcpt-to command")
    try:
        return smtp_syntax.parse_path(arg[3:], allow_empty=False, strict=features["strictparsing"])
    except ValueError as e:
        raise Refused("550 5.1.3 %s" % e) from None


def rcpt_params(address, rest, features, smtputf8):
    """((notify, orcpt), the address as stored) for RCPT; raises Refused.

    Without DSN both are '' (the parameters are ignored); with
    force-rcpt-notify-never every recipient gets NOTIFY=NEVER. `smtputf8`
    says whether the transaction is SMTPUTF8.
    """
    dsn = ("", "")
    if features["dsn"]:
        params = smtp_syntax.parse_params(rest)
        try:
            notify = smtp_syntax.dsn_notify(params["NOTIFY"]) if "NOTIFY" in params else ""
            orcpt = smtp_syntax.dsn_orcpt(params["ORCPT"]) if "ORCPT" in params else ""
        except ValueError as e:
            raise Refused("501 5.5.4 %s" % e) from None
        if features["force-rcpt-notify-never"]:
            notify = "NEVER"
        dsn = (notify, orcpt)
    return dsn, mailbox(address, smtputf8, features, rcpt=True)


def mailbox(address, smtputf8, features, rcpt=False):
    """The address as stored (A-labels with alabels); raises Refused (not a bad command)."""
    if address.isascii():
        return address
    refusal = "550 5.6.7 " if rcpt else "553 5.6.7 mailbox name not allowed: "
    if features["smtputf8strict"] and not smtputf8:
        raise Refused(refusal + "invalid character in mailbox name", bad=False)
    if features["alabels"]:
        try:
            return smtp_syntax.to_alabels(address)
        except ValueError as e:
            raise Refused(refusal + str(e), bad=False) from None
    return address
