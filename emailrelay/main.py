"""The program's entry point: options, --help and --version, then the run.

`run(argv)` is the entry point for `python3 -m emailrelay`, `emailrelay.py`
and the zipapp. Everything that can fail on bad configuration (options,
secrets files, filter specs, TLS certificates, listening addresses, the spool
directory) is checked before the process daemonises, so a mistake gives one
clear line and a non-zero exit status (`build`). The rest of the program
(`modes`) is imported only when it is going to run, so `--help` and
`--version` stay cheap.

Exit statuses (`usage.EXIT_*`): 0 success; 1 a start-up or run-time failure
(including `--as-client` when any message was not forwarded); 2 a usage
error.
"""

import os
import sys

from .config import options, usage


def run(argv=None):
    """Runs the program with `argv` (default sys.argv[1:]); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = options.parse(argv)
    except options.UsageError as e:
        sys.stderr.write("emailrelay: usage error: %s\n" % e)
        sys.stderr.write("emailrelay: try --help for more information\n")
        return usage.EXIT_USAGE
    if cfg.help:
        sys.stdout.write(usage.help_text(cfg.verbose))
        return usage.EXIT_OK
    if cfg.version:
        sys.stdout.write(usage.version_text(cfg.verbose))
        return usage.EXIT_OK
    # Imported here: --help and --version must not load the whole program.
    from . import modes
    return modes.start(cfg)


def entry(function=None):
    """Runs `function` (default run) as a program's entry point; returns its status.

    Writing to a closed pipe (`emailrelay --version | grep -q x`) ends the
    program quietly with status 1, as a C program's SIGPIPE would, rather
    than with a traceback.
    """
    try:
        return (function or run)()
    except BrokenPipeError:
        # Later flushes of the dead stream (at exit) must not complain either.
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
        return usage.EXIT_FAILURE
