"""A private syslog receiver, and running programs as installed, for tests.

syslog(3) (and so Python's `syslog` module) always writes to /dev/log. To
see what a program sends there without touching the host's /dev, a
`SyslogReceiver` binds its own unix datagram socket, and `command(argv)`
wraps a command line so that it runs in a private mount namespace whose
/dev is an overlay of the real one plus a `log` that is this socket. The
namespace lives as long as any process in it, so a program the command
leaves in the background (an ip-up hook does) still logs here.

`command(argv, dest, dirs)` also shows, in the same namespace, what `make
install DESTDIR=dest` staged as if it were installed: each of `dirs` (such
as /usr/sbin) becomes a read-only overlay of `dest`'s copy on the host's.

Both need root (mounts in a new namespace); `usable()` says whether this
host allows them.
"""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading

from helpers import wait_for

# The shell script run by unshare: $1 the work directory, $2 the socket,
# $3 the staging root or "", $4 a space-separated list of directories to
# overlay from it, the rest the command.
_SCRIPT = r"""set -e
work=$1 sock=$2 dest=$3 dirs=$4
shift 4
mount -t overlay overlay -o "lowerdir=/dev,upperdir=$work/up,workdir=$work/work" /dev
: > /dev/log
mount --bind "$sock" /dev/log
for dir in $dirs; do
    mount -t overlay overlay -o "lowerdir=$dest$dir:$dir" "$dir"
done
exec "$@"
"""


def usable():
    """True when this host lets the tests mount in a private namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return probe.returncode == 0


class SyslogReceiver:
    """Collects syslog datagrams sent to /dev/log by commands run through `command`.

    `messages` holds each datagram as text (`<priority>timestamp tag[pid]:
    text`); `wait_for(pattern)` waits until one matches. Use it as a
    context manager, or call `close()`.
    """

    def __init__(self, directory):
        self.dir = str(directory)
        for sub in ("up", "work"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        # A unix socket's path is limited to about 100 bytes: a short one.
        self._sock_dir = tempfile.mkdtemp(prefix="syslogd-")
        self.path = os.path.join(self._sock_dir, "log.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        # The program logs after switching to its --user.
        os.chmod(self.path, 0o666)
        self.messages = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:  # shut down by close()
                return
            with self._lock:
                self.messages.append(data.decode("utf-8", "replace"))

    def command(self, argv, dest="", dirs=()):
        """`argv` wrapped to run with this receiver as /dev/log (see the module docstring)."""
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SCRIPT, "sh",
                self.dir, self.path, str(dest), " ".join(dirs)] + list(argv)

    def text(self):
        """Every message so far, one per line."""
        with self._lock:
            return "\n".join(self.messages)

    def wait_for(self, pattern, timeout=30.0):
        """Waits until a message matches the regular expression; returns the match."""
        rx = re.compile(pattern)

        def search():
            with self._lock:
                return next(filter(None, (rx.search(m) for m in self.messages)), None)
        try:
            return wait_for(search, timeout, what="syslog %r" % pattern)
        except AssertionError as e:
            raise AssertionError("%s; got:\n%s" % (e, self.text())) from None

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
