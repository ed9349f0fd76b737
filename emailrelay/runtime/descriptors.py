"""File descriptors: the open-files limit, and waiting on one descriptor.

A relay serving `--max-connections` clients needs a few descriptors per
session (the connection, the content file, the envelope), and the usual
soft limit (1024, systemd's default) is smaller than what a large budget
needs. `raise_limit(needed)` raises the soft limit to the hard limit when
`needed` is more than the soft limit allows, as a C server would at
start-up.

Once the limit is above FD_SETSIZE (1024), a descriptor may get a number
that `select.select()` refuses (ValueError), so code that waits for one
descriptor uses `readable()`, built on poll(), instead.
"""

import resource
import select


def limits():
    """The open-files limit as (soft, hard); either may be resource.RLIM_INFINITY."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def limit_text(value=None):
    """A limit (default: the soft open-files limit) for a log line: a number or `unlimited`."""
    value = limits()[0] if value is None else value
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def raise_limit(needed):
    """Raises the soft open-files limit to the hard one if it is below `needed`.

    Returns (old soft limit, new soft limit, whether it is `needed` or
    more). The new soft limit is the hard limit, or `needed` when the hard
    limit is infinite (the kernel caps the open-files limit at its nr_open,
    so infinity cannot be set). Raises OSError or ValueError when the
    system refuses the change.
    """
    soft, hard = limits()
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft, soft, True
    new = needed if hard == resource.RLIM_INFINITY else hard
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return soft, new, new >= needed


def readable(fd, timeout=None):
    """Waits until `fd` (a descriptor or an object with fileno()) is readable.

    True when it is (or has hung up, so a read will not block), False when
    `timeout` seconds (None: no limit) passed first.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(poller.poll(ms))
