"""emailrelay-resubmit: returns failed messages to the queue, a limited number of times.

For each `.envelope.bad` file in the spool directory it counts the failure
reasons recorded in it (`X-MailRelay-Reason:` lines; every failure appends
one) and, while the count is below the retry limit, renames it back to
`.envelope` so the next forwarding pass tries it again. The reasons are kept,
so the count survives each retry. Only `.bad` files are touched and each
change is one atomic rename: it is safe to run from cron while the server
runs. The default limit (5) is that of E-MailRelay's emailrelay-resubmit.sh.
"""

import argparse
import os
import sys

from ..store import spool

DEFAULT_SPOOL_DIR = "/var/spool/emailrelay"
DEFAULT_RETRIES = 5


def failure_count(path):
    """How many failures the envelope file records."""
    count = 0
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"X-MailRelay-Reason:"):
                count += 1
    return count


def resubmit(spool_dir, retries=DEFAULT_RETRIES, report=None):
    """Resubmits the `.bad` envelopes with fewer than `retries` failures; returns how many.

    `report(name, count, resubmitted)` is called for each `.bad` file when given.
    """
    done = 0
    with os.scandir(spool_dir) as it:
        names = sorted(e.name for e in it if e.name.endswith(spool.BAD) and not e.name.startswith("."))
    for name in names:
        path = os.path.join(spool_dir, name)
        try:
            count = failure_count(path)
        except FileNotFoundError:
            continue
        retry = count < retries
        if retry:
            try:
                os.rename(path, path[:-len(spool.BAD)] + spool.READY)
            except FileNotFoundError:
                # Resubmitted by someone else meanwhile (admin unfail-all).
                continue
            done += 1
        if report:
            report(name, count, retry)
    return done


def run(argv=None):
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="emailrelay-resubmit",
        description="Renames failed (.envelope.bad) messages in the spool directory back to "
                    ".envelope so that they are forwarded again, unless they have already "
                    "failed --retries times.")
    parser.add_argument("-s", "--spool-dir", metavar="<dir>", help="the spool directory (default %s)"
                        % DEFAULT_SPOOL_DIR)
    parser.add_argument("-r", "--retries", type=int, default=DEFAULT_RETRIES, metavar="<n>",
                        help="resubmit only messages with fewer than n recorded failures "
                             "(default %d)" % DEFAULT_RETRIES)
    parser.add_argument("-v", "--verbose", action="store_true", help="says what is done with each file")
    parser.add_argument("directory", nargs="?", metavar="<spool-dir>",
                        help="the spool directory, as E-MailRelay's script takes it")
    args = parser.parse_args(argv)
    spool_dir = args.spool_dir or args.directory or DEFAULT_SPOOL_DIR
    if args.spool_dir and args.directory and args.spool_dir != args.directory:
        parser.error("two different spool directories given")
    if args.retries < 0:
        parser.error("--retries must not be negative")
    if not os.path.isdir(spool_dir):
        print("emailrelay-resubmit: invalid spool directory: %s" % spool_dir, file=sys.stderr)
        return 1

    def report(name, count, retried):
        print("%s: %d failure%s: %s" % (name, count, "" if count == 1 else "s",
                                        "resubmitted" if retried else "left (retry limit reached)"))
    try:
        resubmit(spool_dir, args.retries, report if args.verbose else None)
    except OSError as e:
        print("emailrelay-resubmit: %s: %s" % (e.filename or spool_dir, e.strerror), file=sys.stderr)
        return 1
    return 0
