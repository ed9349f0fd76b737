"""An external password checker (`--server-auth-program`, ZMailer's SMTP-auth-pipe).

`AuthProgram(path, timeout).check(user, password)` runs the program with
the user name as its one argument and writes the password and a newline to
its standard input; exit status 0 means the password is right. Anything
else (another status, a crash, a program that cannot be started, no answer
within `timeout` seconds) is a refusal.

The program runs the way filters do (see `filters`): no shell, an
environment holding only PATH and IFS, stdout and stderr on /dev/null, no
other inherited descriptors, as --user and never as root, in a session of its own whose whole process
group is killed at the timeout. The password goes only through the pipe: it
is never in an argument, the environment or a log line. A check blocks only
the calling session's thread.
"""

import os
import signal
import subprocess

from ..runtime import log, process
from . import filters


class AuthProgram:
    """One configured checker program; `check` may be called from several threads."""

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout

    def check(self, user, password):
        """True when the program accepts `password` for `user`."""
        env = {"PATH": filters.FILTER_ENV_PATH, "IFS": " \t\n"}
        data = password.encode("utf-8", "surrogateescape") + b"\n"
        try:
            proc = subprocess.Popen([self.path, user], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=env, close_fds=True, start_new_session=True,
                                    **process.child_ids())
        except (OSError, ValueError) as e:
            log.error("cannot run --server-auth-program %s: %s"
                      % (self.path, getattr(e, "strerror", None) or e))
            return False
        try:
            proc.communicate(data, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
            log.warning("--server-auth-program %s: no answer after %gs: refusing user %s"
                        % (self.path, self.timeout, log.sanitise(user)))
            return False
        except OSError:
            # The program exited without reading the password (EPIPE).
            proc.wait()
        if proc.returncode < 0:
            log.warning("--server-auth-program %s: killed by signal %d"
                        % (self.path, -proc.returncode))
        return proc.returncode == 0
