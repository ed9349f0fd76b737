"""What SMTP sessions take from the configuration, and the form of their replies.

`SmtpSettings.from_config(cfg)` reads the configuration once per process
(`build` makes it; each session gets it in `SmtpServices.settings`).
Replies are written with RFC 3463 enhanced status codes; the default
replies are E-MailRelay 2.6's, which have none, so unless
`--server-smtp-config +enhancedstatuscodes` is given (`enhanced`) they are
taken out (`plain_reply`). Replies sent outside a session (the listeners'
busy and refusal texts, --inetd's open-relay guard) are `reply_bytes`.
"""

import dataclasses
import re
import types
from typing import Optional, Tuple

from . import session_core

# An enhanced code after the reply code, followed by text or by the end of
# the line (an empty line of a multi-line reply).
_ENHANCED_CODE = re.compile(r"^(\d{3}[ -])\d\.\d{1,3}\.\d{1,3}(?: |(?=\r|$))", re.M)


def plain_reply(text):
    """`text` (one reply, perhaps multi-line) without its RFC 3463 enhanced codes.

    The default replies are E-MailRelay's, which has none; replies sent
    outside a session (the busy and refusal texts) use this too.
    """
    if text[5:6] != ".":
        return text
    if "\n" not in text and text[4:5].isdigit():
        # The common case, one line: "250 2.1.5 text" -> "250 text".
        i = text.find(" ", 5)
        return text[:4] + (text[i + 1:] if i > 0 else "")
    return _ENHANCED_CODE.sub(r"\1", text)


def reply_bytes(settings, text):
    """A one-off reply line as sent on the wire, enhanced codes only if `settings` say so."""
    if not settings.enhanced:
        text = plain_reply(text)
    return (text + "\r\n").encode("ascii")


@dataclasses.dataclass(frozen=True)
class SmtpSettings(session_core.SessionSettings):
    """What every SMTP session takes from the configuration, read once per process.

    Besides the core's (`max_bad_commands` None: E-MailRelay's rule, the
    client is dropped at its 8th error, `smtp_server.PROTOCOL_ERROR_LIMIT`):
    `size` (--size, 0: no limit), `helo_check`, `greeting` (--greeting
    lines, () for the default), `min_free_space` (kbytes, 0: no check),
    `max_recipients` and `max_bounce_recipients` (0: no limit),
    `min_data_rate` (0: only the idle timeout), `immediate`, `features`
    (--server-smtp-config, read-only), `enhanced` (its
    enhancedstatuscodes), `anonymous` (--anonymous scopes) and `tarpit`
    ((initial, exponent, limit) or None).
    """

    size: int
    helo_check: bool
    greeting: Tuple[str, ...]
    min_free_space: int
    max_recipients: int
    max_bounce_recipients: int
    min_data_rate: int
    immediate: bool
    features: types.MappingProxyType
    enhanced: bool
    anonymous: frozenset
    tarpit: Optional[tuple]

    @classmethod
    def from_config(cls, cfg):
        features = types.MappingProxyType(dict(cfg.server_features))
        return super().from_config(
            cfg, size=cfg.size or 0, helo_check=bool(cfg.helo_check),
            greeting=tuple(cfg.greeting or ()), min_free_space=cfg.min_free_space or 0,
            max_recipients=cfg.max_recipients or 0,
            max_bounce_recipients=cfg.max_bounce_recipients or 0,
            min_data_rate=cfg.min_data_rate or 0, immediate=bool(cfg.immediate),
            features=features, enhanced=features["enhancedstatuscodes"],
            anonymous=frozenset(cfg.anonymous_scopes),
            tarpit=tuple(cfg.tarpit_steps) if cfg.tarpit_steps else None)
