"""The ways the program runs once its parts are built: daemon, worker, one-shot, stdio.

`start(cfg)` configures logging, builds the parts (`build.services`) and
runs the mode the options ask for: the daemon (daemonise, drop privileges,
recover the spool, serve until SIGTERM, with --workers a supervisor), a
one-shot forwarding run (--as-client, --dont-serve), or one session on
stdin and stdout (--inetd, --bsmtp). It returns the exit status.
"""

import codecs
import importlib
import os
import pkgutil
import signal
import sys
import threading

from . import build
from .auth import auth_budget
from .config import options, usage
from .runtime import descriptors, log, process, workers
from .server import stdio_server
from .util.stats import Stats

# File descriptors a session may hold at once (its connection, the content
# file, the envelope), and what a serving process holds besides its
# sessions (listeners, log, selectors, over-limit connections waiting for
# their reply, the forwarder, filter pipes).
DESCRIPTORS_PER_SESSION = 3


DESCRIPTORS_BESIDES = 128


# What makes a process forward by itself (--as-client and --as-proxy imply
# one); the admin interface's flush counts as the site's own trigger.
_FORWARDING_TRIGGERS = ("forward", "forward-on-disconnect", "poll", "immediate", "dont-serve",
                        "admin")


def start(cfg):
    """Configures logging, builds the parts and runs; returns the exit status."""
    try:
        log.configure(cfg, process.privileged)
    except OSError as e:
        sys.stderr.write("emailrelay: error: cannot open log file %s: %s\n"
                         % (log.sanitise(e.filename or cfg.log_file), e.strerror or e))
        return usage.EXIT_FAILURE
    for note in cfg.notes:
        log.verbose(note)
    if not cfg.given("domain") and options.domain_is_localhost(cfg.domain):
        log.warning("this host is only called localhost: using %s as --domain (the EHLO "
                    "name and greeting); set --domain to a name the next hop accepts"
                    % cfg.domain)
    try:
        services = build.services(cfg)
    except build.StartupError as e:
        log.startup_error(str(e))
        return usage.EXIT_FAILURE
    if cfg.forward_to and not any(cfg.given(o) for o in _FORWARDING_TRIGGERS):
        log.warning("--forward-to is given but nothing starts forwarding: messages wait in "
                    "the spool; add --forward-on-disconnect, --poll, --immediate or --forward "
                    "(or run --as-client from cron or an ip-up hook)")
    return run_daemon(cfg, services)


def run_daemon(cfg, services):
    """Daemonises, drops privileges, starts forwarding and serves until stopped."""
    try:
        entry = process.user_entry(cfg.user)
    except process.ProcessError as e:
        log.startup_error(str(e))
        return usage.EXIT_FAILURE
    _preload(cfg, entry)
    error = _preflight(cfg, services, entry)
    if error:
        log.startup_error(error)
        return usage.EXIT_FAILURE
    if cfg.dont_serve:
        return _run_client(cfg, services)
    if cfg.inetd or cfg.bsmtp:
        return _run_stdio(cfg, services)
    server = services.server
    group = entry.pw_gid if entry is not None else None
    _raise_descriptor_limit(cfg)
    process.set_umask()
    try:
        if not cfg.no_daemon:
            process.daemonise(cfg.pid_file, group)
        elif cfg.pid_file:
            process.write_pid_file(cfg.pid_file, group)
    except process.ProcessError as e:
        log.startup_error(str(e))
        return usage.EXIT_FAILURE
    try:
        if not _drop_privileges(cfg) or not _recover(cfg, services):
            return usage.EXIT_FAILURE
        signals = process.Signals(wakeup_fd=server.wakeup_fd())
        shared = services.worker_listeners
        for kind, address in (shared.addresses() if shared else []) + server.addresses():
            log.info("%s server on %s" % (kind, address))
        if cfg.close_stderr:
            log.close_stderr()
        supervisor = None
        if shared is not None:
            # Forked before the forwarder's thread starts (and after the
            # switch to --user, which each worker keeps).
            supervisor = workers.Supervisor(
                cfg.workers, lambda channel: _run_worker(cfg, services, channel),
                forwarder=services.forwarder, recover=services.spool.recover)
            supervisor.start()
        if services.forwarder is not None:
            services.forwarder.start(initial=cfg.forward)
        process.notify_ready()

        def on_hup():
            _reload(services)
            if supervisor is not None:
                supervisor.signal_all(signal.SIGHUP)
        _serve(server, services.stop_event, signals, on_hup)
        log.info("stopping")
        if supervisor is not None:
            supervisor.stop()
        if services.forwarder is not None:
            services.forwarder.stop()
        return usage.EXIT_OK
    finally:
        if cfg.pid_file:
            process.remove_pid_file(cfg.pid_file)


def _raise_descriptor_limit(cfg):
    """Raises the open-files limit to what --max-connections may need, or says it cannot.

    Each served kind (SMTP, POP, admin) has a budget of --max-connections
    sessions; with --workers each worker has its own, and its own limit.
    """
    kinds = int(not cfg.no_smtp) + int(bool(cfg.pop)) + int(bool(cfg.admin))
    needed = kinds * cfg.max_connections * DESCRIPTORS_PER_SESSION + DESCRIPTORS_BESIDES
    try:
        old, new, enough = descriptors.raise_limit(needed)
    except (OSError, ValueError) as e:
        log.warning("cannot raise the open-files limit for --max-connections %d: %s"
                    % (cfg.max_connections, e))
        return
    if new != old:
        log.verbose("open-files limit raised from %s to %s for --max-connections %d"
                    % (old, descriptors.limit_text(new), cfg.max_connections))
    if not enough:
        log.warning("the open-files limit (%s) is below the %d descriptors --max-connections "
                    "%d may need and the hard limit allows no more: clients beyond it wait, "
                    "then get the busy reply (raise LimitNOFILE= or ulimit -Hn)"
                    % (new, needed, cfg.max_connections))


def _serve(server, stop, signals, on_hup):
    """Runs `server`'s accept loop until SIGTERM/SIGINT (`signals`) or `stop` is set."""
    def on_wake():
        if signals.stop.is_set():
            stop.set()
        if signals.hup.is_set():
            signals.hup.clear()
            on_hup()

    def watch_stop():
        stop.wait()
        server.wake()
    threading.Thread(target=watch_stop, name="stop watcher", daemon=True).start()
    server.serve(stop, on_wake=on_wake)


def _run_worker(cfg, services, channel):
    """The whole of a --workers process: serves SMTP and POP until stopped.

    It has its own accept loop, connection limits, counters and
    authentication-failure budget (nothing it shares with the main process
    may hold a lock that a thread of the main process took before the
    fork), and a workers.ForwarderLink in place of the forwarder.
    """
    process.forked_child()
    for lst in services.server.listeners:
        lst.sock.close()
    own = services.copy()
    own.stop_event = threading.Event()
    own.stats = Stats(build.STATS)
    own.events = None
    own.worker_listeners = None
    if services.forwarder is not None:
        own.forwarder = workers.ForwarderLink(channel)
    if services.auth_budget is not None:
        own.auth_budget = auth_budget.FailureBudget()
    own.server = build.new_server(cfg)
    inherited = services.worker_listeners.listeners
    interfaces = {lst.kind: [] for lst in inherited}
    for lst in inherited:
        interfaces[lst.kind].append("fd#%d" % os.dup(lst.sock.fileno()))
        lst.sock.close()
    build.add_sessions(own.server, cfg, own, interfaces)
    build.forward_on_disconnect(own.server, own)
    signals = process.Signals(wakeup_fd=own.server.wakeup_fd())
    workers.watch_main(channel, own.stop_event.set)
    log.verbose("worker serving %s" % ", ".join(kind for kind in interfaces))
    _serve(own.server, own.stop_event, signals, lambda: _reload(own))


def _run_stdio(cfg, services):
    """--inetd / --bsmtp: one session on stdin and stdout, as --user, then exit.

    The spool is not recovered here: a daemon or forwarder may be working
    on it at the same time, and each inetd session is only one client.
    """
    process.set_umask()
    if not _drop_privileges(cfg):
        return usage.EXIT_FAILURE
    return stdio_server.run(stdio_server.StdioSettings.from_config(cfg), services.smtp())


def _drop_privileges(cfg):
    """Switches the effective ids to --user; False (logged) on failure."""
    try:
        entry = process.drop_privileges(cfg.user)
    except process.ProcessError as e:
        log.startup_error(str(e))
        return False
    if entry is not None:
        log.verbose("switched to user %s (uid %d)" % (cfg.user, entry.pw_uid))
    return True


def _recover(cfg, services):
    """Repairs what a dead process left in the spool; False (logged) on failure.

    It runs after the switch to --user, in spool windows like every other
    spool operation: under a capability bounding set without
    CAP_DAC_OVERRIDE (the systemd unit), root can reach a spool owned by
    --user only through the user's group.
    """
    try:
        services.spool.recover()
    except OSError as e:
        log.startup_error("cannot read spool directory %s: %s" % (cfg.spool_dir, e.strerror or e))
        return False
    return True


def _preflight(cfg, services, entry):
    """Checks, before daemonising, what the program will do as --user.

    Without a user switch: the spool must be writable. With one, a short-
    lived child switches like the daemon and checks that the programs it
    will run are executable by the user and that logging works; the error
    text is the real cause of a failure.
    """
    if entry is None:
        if not os.access(cfg.spool_dir, os.W_OK | os.X_OK):
            return "spool directory %s is not writable" % cfg.spool_dir
        return None
    programs = list(build.program_paths(services.programs))

    def programs_runnable():
        for spec, path in programs:
            if not os.access(path, os.X_OK, effective_ids=True):
                return "%s: not executable by user %s (see --user)" % (spec, cfg.user)
        return None

    def spool_readable():
        # Only filters read the spool as --user; the program itself
        # reclaims root for spool files.
        if programs and not os.access(cfg.spool_dir, os.R_OK | os.X_OK, effective_ids=True):
            log.warning("spool directory %s cannot be read by user %s: filter and verifier "
                        "programs run as that user" % (cfg.spool_dir, cfg.user))
        return None

    def logging_works():
        log.debug("start-up check as user %s" % cfg.user)
        return None
    return process.preflight(cfg.user, [programs_runnable, spool_readable, logging_works])


def _preload(cfg, entry):
    """Imports everything the program may need while it is still root.

    After --user the interpreter's own library may no longer be readable (a
    Python installed under /root, say), and a module first imported then
    would fail in the middle of a session. Every module of this package is
    imported, the standard-library modules they import lazily, and the
    codecs they name (a codec is imported on its first use: `encode("idna")`
    of a UTF-8 domain needs `encodings.punycode`).
    """
    if entry is None:
        return
    package = os.path.dirname(os.path.abspath(__file__))
    names = [m.name for m in pkgutil.walk_packages([package], "emailrelay.")
             if m.name != "emailrelay.__main__"]
    names += _LAZY_STDLIB
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for name in _CODECS:
        codecs.lookup(name)


# Standard-library modules that parts of the program import only when first
# used.
_LAZY_STDLIB = ["selectors", "signal", "subprocess", "shlex", "shutil", "smtplib", "select",
                "ssl", "ctypes", "ctypes.util", "hmac", "hashlib", "syslog", "functools",
                "ipaddress", "pwd", "grp", "email", "email.utils", "email.parser",
                "encodings.idna", "encodings.latin_1", "encodings.ascii", "encodings.utf_8",
                "stringprep", "unicodedata", "base64", "binascii", "uuid", "queue", "platform"]


# Codecs the sessions use by name ("idna" asks for "punycode" in turn).
_CODECS = ["idna", "punycode", "utf-8", "ascii"]


def _run_client(cfg, services):
    """--as-client / --dont-serve: forward once and exit with the outcome.

    SIGTERM and SIGINT stop it as they stop the daemon: the message in hand
    is finished, the others stay queued (no `.busy` file is left).
    """
    if services.forwarder is None:
        return usage.EXIT_OK
    if not _drop_privileges(cfg) or not _recover(cfg, services):
        return usage.EXIT_FAILURE
    signals = process.Signals()
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(services.forwarder.run_once()),
                              name="forwarder")
    try:
        worker.start()
        stopping = False
        while worker.is_alive():
            worker.join(0.2)
            if signals.stop.is_set() and not stopping:
                stopping = True
                log.info("stopping")
                services.forwarder.stop()
    finally:
        signals.restore()
    ok = bool(outcome) and outcome[0]
    if not ok:
        # Info, not error: E-MailRelay 2.6 reports nothing above info here,
        # and scripts that watch stderr take an error for a start-up
        # failure. The exit status still says it.
        log.info("forwarding: not every message was forwarded: exit status 1")
    return usage.EXIT_OK if ok else usage.EXIT_FAILURE


def _reload(services):
    """SIGHUP: reopen the log file and re-read the secrets files.

    Both happen in a root window, so that root-only (0600) secrets files and
    log files in root's directories still work after --user.
    """
    log.reopen()
    for holder in (services.server_secrets, services.pop_secrets):
        if holder is None or isinstance(holder, str):
            continue
        try:
            with process.privileged():
                holder.reload()
            log.info("re-read secrets file %s" % holder.path)
        except Exception as e:
            log.error("cannot re-read secrets file: %s (keeping the old one)" % e)
