"""What the next hop's replies to a mail transaction mean for the message.

`Outcome` is what happened to one message (the result of
`smtp_client.Client.send()`); `judge()` reads the replies to MAIL, RCPT
and DATA and says whether the message fails before its content goes;
`rejection_reason()` and `reply_text()` make the texts that go into a
`.bad` envelope and the log.
"""


class Outcome:
    """What happened to one message.

    `ok`: the next hop accepted it (for at least one recipient with
    --forward-to-some). `code`: the deciding reply code (0 when the failure
    is ours, such as a missing extension), so 400-499 is a temporary
    failure. `reason`: reply text or failure reason. `rejected`:
    [(recipient, reply text)] refused recipients.
    """

    def __init__(self, ok, code, reason, rejected=()):
        self.ok = ok
        self.code = code
        self.reason = reason
        self.rejected = list(rejected)

    @property
    def temporary(self):
        """True for a 4xx refusal: the message may go later."""
        return 400 <= self.code < 500

    def __repr__(self):
        return "Outcome(ok=%r, code=%r, reason=%r, rejected=%r)" % (
            self.ok, self.code, self.reason, self.rejected)


def reply_text(code, msg):
    """A reply as one line of text: the code, then its lines (bytes or text) joined by spaces."""
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    return ("%d %s" % (code, " ".join(text.split("\n")))).strip()


def judge(env, replies, bdat, forward_to_some):
    """An Outcome when MAIL/RCPT/DATA replies mean the message fails, else None.

    `replies` are the (code, text) replies to the commands for envelope
    `env`, MAIL first; `bdat` says whether the last is DATA's (False) or
    the content goes by BDAT. Refused recipients fail the whole message
    with E-MailRelay's reasons: `one or more recipients rejected` (or, with
    --forward-to-some, `all recipients rejected` when none was
    accepted), followed by each refused recipient and its reply. The
    code is the highest refusal code, so one 5xx makes it permanent.
    """
    code, msg = replies[0]
    if code >= 300:
        return Outcome(False, code, reply_text(code, msg))
    rcpt_replies = replies[1:1 + len(env.to_remote)]
    refused = [(r, c, m) for r, (c, m) in zip(env.to_remote, rcpt_replies) if c >= 300]
    everyone = len(refused) == len(env.to_remote)
    if refused and (everyone or not forward_to_some):
        how_many = "all" if everyone and forward_to_some else "one or more"
        rejected = [(r, reply_text(c, m)) for r, c, m in refused]
        return Outcome(False, max(c for _, c, _ in refused),
                       rejection_reason(how_many, rejected), rejected)
    if not bdat:
        code, msg = replies[-1]
        if code != 354:
            return Outcome(False, code, reply_text(code, msg))
    return None


def rejection_reason(how_many, rejected):
    """`<how_many> recipients rejected: <r> reply; ...` for a `.bad` reason."""
    return "%s recipients rejected: %s" % (
        how_many, "; ".join("<%s> %s" % (r, text) for r, text in rejected))
