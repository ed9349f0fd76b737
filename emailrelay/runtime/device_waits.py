"""How long a thread has waited for a storage device, and which functions mostly wait so.

Some work blocks only on its device (the syncs and renames that commit a
message): on tmpfs or a disk with a fast cache it waits next to nothing,
and running it where it is asked for costs less than handing it to
another thread and back. Whether it does is for the driver of the
conversation to decide, not for the code that asks; this module gives it
what it needs:

- the owner of such a function marks it `@device_bound`, and does its
  waits through `fsync`, `datasync` or `timed` here;
- the driver measures with `waited()` (the seconds the calling thread has
  spent in those waits) how long a marked function waited when it ran in
  place, and finds the mark with `is_device_bound(fn)` (a bound method's
  too).

Wait time, not elapsed time, is what counts: the rest of the work is CPU
time, spent with the GIL wherever it runs, and a busy CPU or a tracer
would make quick work look slow.
"""

import os
import threading
import time

_waits = threading.local()


def device_bound(function):
    """Marks `function` as work whose waits are its device's, timed by this module.

    A driver may run a call of it in place while `waited()` says it waits
    little. Put it outside other decorators, or inside ones that copy the
    function's attributes (`functools.wraps` does).
    """
    function.device_bound = True
    return function


def is_device_bound(fn):
    """True when `fn` (a function, or a bound method of one) is marked `@device_bound`."""
    return getattr(getattr(fn, "__func__", fn), "device_bound", False)


def waited():
    """Seconds the calling thread has spent in this module's timed waits so far.

    Only ever grows: the difference across a piece of work is how long it
    waited for the device, whatever the CPU or a tracer cost meanwhile.
    """
    return getattr(_waits, "seconds", 0.0)


def timed(wait, *args):
    """wait(*args), its time counted as the calling thread's device wait (see `waited`)."""
    start = time.monotonic()
    try:
        return wait(*args)
    finally:
        _waits.seconds = waited() + time.monotonic() - start


def fsync(fd):
    """fsync(2), timed for waited()."""
    timed(os.fsync, fd)


# fdatasync() also writes the metadata needed to read the data back (the
# size of a new file), which is all a spool file needs; it skips timestamps.
_datasync = getattr(os, "fdatasync", os.fsync)


def datasync(fd):
    """fdatasync(2) where there is one, else fsync(2); timed for waited()."""
    timed(_datasync, fd)
