"""The commands that open a mail transaction with the next hop: MAIL FROM with its parameters, RCPT TO.

`commands(client, claim)` gives them for one claimed message, with what the
next hop offers (`client.has_extn()`) and the session we have with it
(`client.authenticated_as`): SIZE, BODY=8BITMIME or BINARYMIME, SMTPUTF8,
AUTH= (E-MailRelay's MailFromAuthOut rules), RFC 3461's RET, ENVID,
NOTIFY and ORCPT, and DATA unless the content goes by BDAT. A message that
cannot be sent as it is raises `Unsendable`.
"""

import os

from ..runtime import log
from ..util import xtext

_BAD_ADDRESS_CHARACTERS = set("\r\n\0<>") | {chr(c) for c in range(0x20)} | {"\x7f"}


class Unsendable(Exception):
    """The message cannot be sent as it is; the text says why."""


def address_problem(address):
    """Why `address` cannot go in MAIL or RCPT (a text), or None when it can."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return "address is not valid UTF-8: <%s>" % log.sanitise(
            address.encode("utf-8", "surrogateescape"))
    if _BAD_ADDRESS_CHARACTERS.intersection(address):
        return "address holds a control character or angle bracket: <%s>" % log.sanitise(address)
    return None


def commands(client, claim):
    """MAIL, RCPT... (and DATA unless BDAT) for a message on `client`'s session; raises Unsendable."""
    env = claim.envelope
    for address in [env.from_] + env.to_remote:
        problem = address_problem(address)
        if problem is not None:
            raise Unsendable("invalid envelope: %s" % problem)
    size = os.fstat(claim.open_content().fileno()).st_size
    params = _mail_params(client, env, size)
    lines = ["MAIL FROM:<%s>%s" % (env.from_, "".join(" " + p for p in params))]
    dsn = _dsn(client, env)
    lines += [_rcpt_command(r, dsn) for r in env.to_remote]
    if not uses_bdat(client, env):
        lines.append("DATA")
    return lines


def uses_bdat(client, env):
    """True when the message goes with BDAT: binary content, and the server can take it."""
    return (env.content == "binarymime" and client.has_extn("binarymime")
            and client.has_extn("chunking"))


def _mail_params(client, env, size):
    """The MAIL FROM parameters, or raises Unsendable."""
    params = []
    if client.has_extn("size"):
        params.append("SIZE=%d" % size)
    # Without the extension the message fails only in a --client-smtp-config
    # "strict" mode; otherwise it is sent as it is, as E-MailRelay does.
    strict = client.features
    if env.content == "8bit":
        if client.has_extn("8bitmime"):
            params.append("BODY=8BITMIME")
        elif strict["eightbitstrict"]:
            raise Unsendable("the message has 8-bit content and %s does not offer "
                             "8BITMIME" % client.target)
    elif env.content == "binarymime":
        if uses_bdat(client, env):
            params.append("BODY=BINARYMIME")
        elif strict["binarymimestrict"]:
            raise Unsendable("the message is binary and %s does not offer BINARYMIME "
                             "with CHUNKING" % client.target)
    if env.utf8_mailbox_names:
        if client.has_extn("smtputf8"):
            params.append("SMTPUTF8")
        elif strict["smtputf8strict"]:
            raise Unsendable("the message has UTF-8 mailbox names and %s does not offer "
                             "SMTPUTF8" % client.target)
    auth = _auth_param(client, env)
    if auth is not None:
        params.append("AUTH=" + auth)
    dsn = _dsn(client, env)
    if dsn is not None:
        if dsn.ret:
            params.append("RET=" + dsn.ret)
        if dsn.envid:
            params.append("ENVID=" + dsn.envid)
    return params


def _dsn(client, env):
    """The message's RFC 3461 parameters when the next hop offers DSN, else None.

    A next hop without DSN gets none of them (RFC 3461 4: they must not
    be sent); no delivery status notification is made here either way.
    """
    return env.dsn() if client.has_extn("dsn") else None


def _rcpt_command(address, dsn):
    """`RCPT TO:<address>` with the recipient's NOTIFY and ORCPT when there are any."""
    notify, orcpt = dsn.recipients.get(address, ("", "")) if dsn is not None else ("", "")
    return "RCPT TO:<%s>%s%s" % (address, " NOTIFY=" + notify if notify else "",
                                 " ORCPT=" + orcpt if orcpt else "")


def _auth_param(client, env):
    """The MAIL FROM AUTH= value per the MailFromAuthOut rules, or None.

    As E-MailRelay 2.6: only in a session we authenticated (RFC 4954
    5: the parameter is for an authenticated client), `<>` with
    --anonymous(=client). Empty MailFromAuthOut: our session's name;
    `+` or anything not xtext: `<>` (no name); otherwise it is sent as
    it is.
    """
    if not client.authenticated_as:
        return None
    if "client" in client.cfg.anonymous_scopes:
        return "<>"
    value = (env.mail_from_auth_out or "").strip()
    if not value:
        return xtext.encode(client.authenticated_as)
    if not xtext.valid(value):
        return "<>"
    return value
