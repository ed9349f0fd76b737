"""Test helpers shared by every test file: ports, waiting, running the relay.

`Relay` runs the real program (`python3 -m emailrelay`) as a subprocess on
free loopback ports with its own spool directory and log file, waits until
it is listening (by watching its log, so no connection is spent on probing),
and always stops it. Nothing here sleeps for a fixed time: every wait polls a
condition against a deadline.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")
PYTHON = sys.executable


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (see Relay.start for the race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Polls `predicate()` until it returns a true value, which is returned.

    Raises AssertionError naming `what` when the deadline passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def wait_port(port, host="127.0.0.1", timeout=10.0):
    """Waits until something listens on host:port (this spends one connection)."""
    def probe():
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False
    wait_for(probe, timeout, what="port %d" % port)


def env():
    """The environment for running the program from this tree."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_emailrelay(args, timeout=60, **kwargs):
    """Runs `python3 -m emailrelay ARGS` to completion; returns CompletedProcess."""
    return subprocess.run([PYTHON, "-m", "emailrelay"] + list(args), cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=timeout, **kwargs)


def alive(pid):
    """True if `pid` runs (a zombie left for a non-reaping init counts as dead)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def spool_files(directory, suffix):
    """Sorted names in `directory` ending with `suffix` (e.g. '.envelope')."""
    return sorted(n for n in os.listdir(directory) if n.endswith(suffix))


class Relay:
    """The relay running as a subprocess for one test.

    `Relay(tmp_path, ["--forward-to", ...])` picks a free SMTP port (and POP
    and admin ports when `pop=True` / `admin=True`), a spool directory (or
    `spool=`), and a log file; `start()` (also done by the context manager)
    runs it in the foreground with `--log --verbose` and waits for it to
    listen. Attributes: `port`, `pop_port`, `admin_port`, `spool`,
    `log_path`, `proc`. `prefix` is a command the program runs under
    (`unshare --pid --fork --kill-child`: signals then go to its child; or
    `prlimit --nofile=64:64 --`, which executes the program itself).
    """

    def __init__(self, tmp_path, args=(), spool=None, pop=False, admin=False, smtp=True,
                 name="relay", start=True, user="root", prefix=()):
        self.dir = os.path.join(str(tmp_path), name)
        os.makedirs(self.dir, exist_ok=True)
        self.spool = spool or os.path.join(self.dir, "spool")
        os.makedirs(self.spool, exist_ok=True)
        self.log_path = os.path.join(self.dir, "log")
        self.stderr_path = os.path.join(self.dir, "stderr")
        self.port = free_port()
        self.pop_port = free_port() if pop else None
        self.admin_port = free_port() if admin else None
        self.args = ["--no-daemon", "--log", "--verbose", "--no-syslog",
                     "--spool-dir", self.spool, "--interface", "127.0.0.1",
                     "--port", str(self.port), "--log-file", self.log_path,
                     "--domain", "relay.test"]
        if user:
            self.args += ["--user", user]
        if pop:
            self.args += ["--pop", "--pop-port", str(self.pop_port)]
        if admin:
            self.args += ["--admin", str(self.admin_port)]
        if not smtp:
            self.args += ["--no-smtp"]
        self.args += list(args)
        self.proc = None
        self.prefix = list(prefix)
        self._started = False
        self._listeners = int(smtp) + int(pop) + int(admin)
        if start:
            self.start()

    def start(self, wait=True):
        """Starts the program and, with `wait`, waits until every port listens.

        A port picked by `free_port()` can be taken by another process before
        the program binds it; the first start then picks new ports and tries
        again, so that a busy machine does not fail the test.
        """
        for attempt in range(5):
            self._spawn()
            if not wait:
                break
            try:
                self.wait_ready()
                break
            except AssertionError:
                if self._started or attempt == 4 or "Address already in use" not in self.log():
                    raise
                self._stderr.close()
                self._new_ports()
        self._started = True
        return self

    def _spawn(self):
        if os.path.exists(self.log_path):
            os.rename(self.log_path, self.log_path + ".%d" % time.time_ns())
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(self.prefix + [PYTHON, "-m", "emailrelay"] + self.args,
                                     cwd=ROOT, env=env(),
                                     stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr)

    def _new_ports(self):
        """Replaces the ports this object picked, in its arguments too."""
        for attr, option in (("port", "--port"), ("pop_port", "--pop-port"), ("admin_port", "--admin")):
            old = getattr(self, attr)
            if old is None:
                continue
            new = free_port()
            setattr(self, attr, new)
            for i in range(len(self.args) - 1):
                if self.args[i] == option and self.args[i + 1] == str(old):
                    self.args[i + 1] = str(new)

    def wait_ready(self, timeout=15.0):
        """Waits for the 'listening' log lines; fails early if the program exits."""
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError("emailrelay exited with %s before listening:\n%s%s"
                                     % (self.proc.returncode, self.log(), self.stderr()))
            return len(re.findall(r"\b(smtp|pop|admin) server on ", self.log())) >= self._listeners
        wait_for(ready, timeout, what="emailrelay to listen")

    def log(self):
        """The log file's text so far ('' before it exists)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stderr(self):
        """What the program wrote to stdout/stderr outside the log file."""
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern, timeout=10.0):
        """Waits until the log matches the regular expression; returns the match."""
        rx = re.compile(pattern)
        return wait_for(lambda: rx.search(self.log()), timeout, what="log line %r" % pattern)

    def files(self, suffix, directory=None):
        """Spool file names ending with `suffix`."""
        return spool_files(directory or self.spool, suffix)

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Signals the program and waits for it; returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.program_pid(), sig)
            except ProcessLookupError:
                pass    # it has just exited
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("emailrelay did not stop on signal %d:\n%s" % (sig, self.log()))
        self._stderr.close()
        return self.proc.returncode

    def program_pid(self):
        """The program's process id (under a `prefix`, the prefix command's child,
        or the prefix's own pid once it has executed the program, as `prlimit` does)."""
        pid = self.proc.pid
        if not self.prefix:
            return pid

        def child():
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    if f.read().split(b"\0")[0] == PYTHON.encode():
                        return pid
                with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
                    return int(f.read().split()[0])
            except (OSError, IndexError):
                return None
        return wait_for(child, what="the child of %s" % self.prefix[0])

    def kill(self):
        """SIGKILL, no clean-up by the program (crash tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class SmtpChat:
    """A raw SMTP client: `cmd(line)` sends one line and returns the reply text.

    A reply of several lines comes back joined by CR LF; a connection closed
    by the server ends the reply with "<EOF>".
    """

    def __init__(self, port, source=None, timeout=15):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=source)
        self.f = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self):
        lines = []
        while True:
            line = self.f.readline()
            if not line:
                lines.append("<EOF>")
                break
            lines.append(line.rstrip(b"\r\n").decode("utf-8", "replace"))
            if line[3:4] != b"-":
                break
        return "\r\n".join(lines)

    def send(self, data):
        self.sock.sendall(data)

    def cmd(self, line):
        self.send(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def message(self, body=b"Subject: t\r\n\r\nhello\r\n", from_="a@x.test", to="b@y.test"):
        """MAIL, RCPT, DATA and the text; the list of the four replies."""
        out = [self.cmd("MAIL FROM:<%s>" % from_), self.cmd("RCPT TO:<%s>" % to)]
        out.append(self.cmd("DATA"))
        if out[-1].startswith("354"):
            self.send(body + b".\r\n")
            out.append(self.reply())
        return out

    def close(self):
        self.sock.close()


def stop_process(proc, timeout=5.0):
    """Terminates a peer process, killing it if it has not gone by `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def smtp_sink(port, extra=(), count=100):
    """Starts Postfix's smtp-sink on 127.0.0.1:port; the caller terminates it."""
    args = ["smtp-sink"]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    proc = subprocess.Popen(args + list(extra) + ["127.0.0.1:%d" % port, str(count)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port(port)
    return proc
