"""The spool's file names, errors and durable file primitives.

What every part of the store shares: the suffixes of a message's files and
their states, the errors, creating files with mode 0660 whatever the umask,
writing them whole, syncing directories and whole new files (timed by
`runtime.device_waits`, as a device wait), and whether a content file is
still referred to by an envelope. `spool` (the directory),
`spool_message` (storing a new message) and `spool_claim` (a claimed
message) are built on it; other modules use them through `spool`.
"""

import os

from ..runtime import log, process
from ..runtime.device_waits import fsync

FILE_MODE = 0o660
NEW, READY, BUSY, BAD, LOCAL = ".envelope.new", ".envelope", ".envelope.busy", ".envelope.bad", ".envelope.local"
# Names earlier versions' recovery gave an unfinished message's envelope and
# a content file with no envelope (recover() now removes such leftovers; it
# still removes a `.content.orphan`, and leaves an `.envelope.new.orphan`
# and its content to the administrator).
ORPHAN = ".envelope.new.orphan"
CONTENT = ".content"
CONTENT_ORPHAN = ".content.orphan"
# What every envelope suffix holds.
ENVELOPE = ".envelope"
# Longest first: a name is classified by the first suffix it ends with.
STATES = ((ORPHAN, "orphan"), (NEW, "new"), (BUSY, "busy"), (BAD, "bad"), (LOCAL, "local"),
          (READY, "ready"))
_SUFFIXES = tuple(suffix for suffix, _ in STATES)
# Write content in blocks of this size (a 4 KiB message is one write).
WRITE_BLOCK = 65536


class SpoolError(Exception):
    """The spool cannot do what was asked (bad directory, vanished file, ...)."""


class ContentError(SpoolError):
    """A claimed message's content file cannot be read; the text says why."""


def log_event(level, message):
    """Logs `message` at `level` ('info', 'warning', 'error')."""
    getattr(log, level)(message)


def debug(message_id, change):
    """Logs a state change with --debug."""
    if log.debug_enabled():
        log.debug("spool: %s: %s" % (message_id, change))


def fsync_directory(directory):
    """Makes renames and creations in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync(fd)
    finally:
        os.close(fd)


def create_file(path, flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL):
    """Creates `path` with mode 0660 whatever the umask; returns the fd."""
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_file_durably(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
    """Writes `data` to a new file of mode 0660 and fsyncs it."""
    fd = create_file(path, flags)
    try:
        write_all(fd, data)
        fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def identity(st):
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def subdirectories(directory):
    """Immediate sub-directories of `directory` (not symbolic links)."""
    try:
        # A directory's link count is 2 + its sub-directories on most file
        # systems: the common case (no sub-directories) needs no listing.
        if os.stat(directory).st_nlink == 2:
            return []
        with os.scandir(directory) as it:
            return [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


@process.spool_privileged
def content_shared(content_path, except_path=None):
    """True if an envelope other than `except_path` refers to this content file.

    A content file is shared while any envelope (in any state) with the same
    id exists in its directory or in one of that directory's immediate
    sub-directories (`--pop-by-name` copies made by emailrelay-filter-copy).
    """
    directory, name = os.path.split(os.path.abspath(content_path))
    if not name.endswith(CONTENT):
        return False
    stem = name[:-len(CONTENT)]
    skip = os.path.abspath(except_path) if except_path else None
    # (Written out, not with os.path: a forwarder asks once per message sent.)
    for d in [directory] + subdirectories(directory):
        base = os.path.join(d, stem)
        for suffix in _SUFFIXES:
            p = base + suffix
            if p == skip:
                continue
            try:
                os.lstat(p)
            except (OSError, ValueError):
                continue
            return True
    return False
