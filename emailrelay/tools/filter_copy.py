"""emailrelay-filter-copy: a `--filter` program for `--pop-by-name`.

Given the content file of a new message, it copies the message's envelope
into every immediate sub-directory of the spool directory as
`<id>.envelope`, so that each POP user (one sub-directory each) gets a
copy; the content file stays in the main spool directory, shared.

As E-MailRelay's program does, it then deletes the main envelope and exits
100, so the message is not forwarded by SMTP. With `--no-delete` the main
envelope stays and it exits 0 (the message is also forwarded). On error it
prints `<<reason>>` and exits 1, so the server rejects the message.
"""

import argparse
import os
import sys

from ..store import spool

USAGE_EPILOG = """\
exit status: 100 when the main envelope was copied and removed, 0 with
--no-delete, 1 on error (with a <<reason>> line on standard output).
With -d, every committed envelope in the given spool directory is copied
(useful after emailrelay-submit, or from cron)."""


class FilterCopyError(Exception):
    """Why the copy failed (shown to the SMTP client as the filter's reason)."""


def user_directories(spool_dir):
    """Immediate sub-directories of the spool (not hidden, not symbolic links)."""
    out = []
    with os.scandir(spool_dir) as it:
        for entry in it:
            if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                out.append(entry.path)
    return sorted(out)


def copy_envelope(envelope_path, target_name, directories):
    """Copies an envelope file durably into each directory as `target_name`.

    Each copy is written under a `.new` name, fsync'd, renamed and the
    directory fsync'd. Returns the names of the directories that failed.
    """
    with open(envelope_path, "rb") as f:
        data = f.read()
    failures = []
    for d in directories:
        tmp = os.path.join(d, target_name + ".new")
        try:
            spool.write_file_durably(tmp, data)
            os.rename(tmp, os.path.join(d, target_name))
            spool.fsync_directory(d)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            failures.append(os.path.basename(d))
    return failures


def copy_message(content_path, delete=True):
    """Copies the envelope of the message whose content file is given.

    Uses `<id>.envelope.new` (as when run by the server), else
    `<id>.envelope`. Returns True if the main envelope was deleted.
    Raises FilterCopyError.
    """
    content_path = os.path.abspath(content_path)
    directory, name = os.path.split(content_path)
    if not os.path.isfile(content_path):
        raise FilterCopyError("no such file: %s" % content_path)
    if not name.endswith(spool.CONTENT):
        raise FilterCopyError("invalid filename: %s" % name)
    stem = name[:-len(spool.CONTENT)]
    envelope_path = os.path.join(directory, stem + spool.NEW)
    if not os.path.exists(envelope_path):
        envelope_path = os.path.join(directory, stem + spool.READY)
        if not os.path.exists(envelope_path):
            raise FilterCopyError("no envelope file for %s" % name)
    return _copy_and_delete(envelope_path, stem, directory, delete)


def _copy_and_delete(envelope_path, stem, directory, delete):
    directories = user_directories(directory)
    if not directories:
        raise FilterCopyError("no sub-directories to copy into: check permissions")
    failures = copy_envelope(envelope_path, stem + spool.READY, directories)
    if failures:
        what = ('the "%s" sub-directory' % failures[0] if len(failures) == 1 else
                '%d sub-directories, including "%s"' % (len(failures), failures[0]))
        raise FilterCopyError("failed to copy envelope file %s into %s" % (envelope_path, what))
    if not delete:
        return False
    os.unlink(envelope_path)
    return True


def copy_spool(spool_dir, delete=True):
    """Copies every committed envelope of the spool; returns how many."""
    count = 0
    for item in spool.Spool(spool_dir).committed():
        try:
            _copy_and_delete(item.envelope_path, item.id, spool_dir, delete)
        except FileNotFoundError:
            # Claimed by a forwarder meanwhile: it is no longer ours to copy.
            continue
        count += 1
    return count


def run(argv=None):
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="emailrelay-filter-copy",
        description="Copies a new message's envelope into every sub-directory of the "
                    "spool directory, for the POP server's --pop-by-name.",
        epilog=USAGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--no-delete", action="store_true",
                        help="keep the main envelope (the message is forwarded too); exit 0")
    parser.add_argument("-d", "--spool-dir", metavar="DIR",
                        help="copy all committed envelopes of this spool directory")
    parser.add_argument("content", nargs="?", help="the message's content file (given by emailrelay)")
    parser.add_argument("envelope", nargs="?",
                        help="the message's envelope file (given by emailrelay 2.1 and later; "
                             "found from the content file's name when left out)")
    args = parser.parse_args(argv)
    try:
        if args.spool_dir:
            if args.content:
                raise FilterCopyError("give either a content file or -d, not both")
            copy_spool(args.spool_dir, delete=not args.no_delete)
            return 0
        if not args.content:
            raise FilterCopyError("usage error: must be run by emailrelay with the full path "
                                  "of a message content file")
        deleted = copy_message(args.content, delete=not args.no_delete)
        return 100 if deleted else 0
    except (FilterCopyError, spool.SpoolError) as e:
        print("<<%s>>" % e)
    except OSError as e:
        print("<<%s: %s>>" % (e.strerror or "error", e.filename or ""))
    sys.stdout.flush()
    return 1
