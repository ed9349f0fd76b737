"""SMTP server policy that needs the system: --max-load and --help-text.

`LoadGuard(threshold)` (one per process) says whether the machine is too
busy for a new session; `load_help_text(path)` reads the lines HELP adds.
The pure parts of ZMailer's controls are in `smtp_controls`.
"""

import os
import threading

from ..runtime import log

HELP_LINE_LIMIT = 500       # keeps each 214 line inside RFC 5321's 512 octets
HELP_LINES_LIMIT = 100


def load_help_text(path):
    """The lines of a --help-text file; raises ValueError saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError("cannot read %s: %s" % (path, getattr(e, "strerror", None) or e)) from None
    if len(lines) > HELP_LINES_LIMIT:
        raise ValueError("%s: more than %d lines" % (path, HELP_LINES_LIMIT))
    result = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip()
        if not line.isprintable() or len(line) > HELP_LINE_LIMIT:
            raise ValueError("%s:%d: a line must be printable text of at most %d characters"
                             % (path, number, HELP_LINE_LIMIT))
        result.append(line)
    return result


class LoadGuard:
    """--max-load: says whether the machine is too busy for a new session.

    `over()` reads the one-minute load average; the change between "over"
    and "back below" is logged once each time it happens, not per
    connection. Safe to call from every session thread.
    """

    def __init__(self, threshold, getloadavg=os.getloadavg):
        self.threshold = threshold
        self._getloadavg = getloadavg
        self._over = False
        self._lock = threading.Lock()

    def over(self):
        try:
            load = self._getloadavg()[0]
        except OSError:
            return False
        over = load > self.threshold
        with self._lock:
            changed = over != self._over
            self._over = over
        if changed and over:
            log.warning("smtp: load average %.2f is above --max-load %g: refusing connections"
                        % (load, self.threshold))
        elif changed:
            log.info("smtp: load average %.2f is back below --max-load %g: accepting connections"
                     % (load, self.threshold))
        return over
