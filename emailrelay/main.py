"""The program: parses options, builds the parts, and runs them.

`run(argv)` is the entry point for `python3 -m emailrelay`, `emailrelay.py`
and the zipapp. Everything that can fail on bad configuration (options,
secrets files, filter specs, TLS certificates, listening addresses, the spool
directory) is checked before the process daemonises, so a mistake gives one
clear line and a non-zero exit status. Heavy modules are imported only once
it is known they are needed, so `--help` and `--version` stay cheap.

Exit statuses: 0 success; 1 a start-up or run-time failure (including
`--as-client` when any message was not forwarded); 2 a usage error.
"""

import os
import sys
import threading

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class StartupError(Exception):
    """A configuration problem found before anything is started."""


class Services:
    """What a protocol session may use: configuration and shared parts.

    Attributes: `cfg`, `spool`, `filters` (list), `verifier` (or None),
    `server_auth` (sasl.ServerAuth or None), `server_secrets`,
    `pop_auth`, `pop_secrets`, `tls_context` (server side, or None),
    `forwarder` (or None), `stats` (dict of counters), `events`
    (forwarder.Events or None), `server` (net.Server), `stop_event`.
    """

    def __init__(self, **kwargs):
        self.cfg = None
        self.spool = None
        self.filters = []
        self.verifier = None
        self.server_auth = None
        self.server_secrets = None
        self.pop_auth = None
        self.pop_secrets = None
        self.tls_context = None
        self.forwarder = None
        self.stats = {}
        self.events = None
        self.server = None
        self.stop_event = None
        self.__dict__.update(kwargs)


def run(argv=None):
    """Runs the program with `argv` (default sys.argv[1:]); returns the exit status."""
    from . import options, usage
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = options.parse(argv)
    except options.UsageError as e:
        sys.stderr.write("emailrelay: usage error: %s\n" % e)
        sys.stderr.write("emailrelay: try --help for more information\n")
        return EXIT_USAGE
    if cfg.help:
        sys.stdout.write(usage.help_text(cfg.verbose))
        return EXIT_OK
    if cfg.version:
        sys.stdout.write(usage.version_text(cfg.verbose))
        return EXIT_OK
    from . import log
    try:
        log.configure(cfg)
    except OSError as e:
        sys.stderr.write("emailrelay: error: cannot open log file: %s\n" % e)
        return EXIT_FAILURE
    for note in cfg.notes:
        log.verbose(note)
    try:
        app = _build(cfg)
    except StartupError as e:
        log.error(str(e))
        return EXIT_FAILURE
    return _run(cfg, app)


def _load_secrets(path, what):
    from . import secrets
    if path == secrets.PAM_PATH:
        from . import pam
        if not pam.available():
            raise StartupError("%s: PAM is not available on this system" % what)
        return path
    try:
        return secrets.Reloadable(path)
    except secrets.SecretsError as e:
        raise StartupError("%s: %s" % (what, e)) from None


def _rescan(services):
    """A filter asked for a spool rescan (exit 102/103): run a forwarding pass."""
    if services.forwarder is not None:
        services.forwarder.trigger()


def _server_auth(holder, cfg, what):
    from . import sasl
    try:
        # With --server-tls, PLAIN and LOGIN wait for STARTTLS/STLS (sasl.py).
        return sasl.ServerAuth(holder, cfg.server_auth_config, domain=cfg.domain,
                               tls_available=bool(cfg.server_tls))
    except ValueError as e:
        raise StartupError("%s: %s" % (what, e)) from None


def _build(cfg):
    """Checks the configuration and builds every part; raises StartupError."""
    from . import spool as spool_mod
    services = Services(cfg=cfg, stop_event=threading.Event())
    services.stats = {"messages-stored": 0, "messages-rejected": 0,
                      "messages-forwarded": 0, "messages-failed": 0}

    if not os.path.isdir(cfg.spool_dir):
        raise StartupError("spool directory does not exist: %s" % cfg.spool_dir)
    services.spool = spool_mod.Spool(cfg.spool_dir)

    if cfg.filter or cfg.client_filter or cfg.address_verifier:
        from . import filters, verifier
        try:
            services.filters = [filters.make(s, cfg.filter_timeout, rescan_cb=lambda: _rescan(services))
                                for s in cfg.filter or []]
            client_filters = [filters.make(s, cfg.filter_timeout, kind="client")
                              for s in cfg.client_filter or []]
            if cfg.address_verifier:
                services.verifier = verifier.make(cfg.address_verifier, cfg.filter_timeout)
        except (filters.NotImplementedSpec, ValueError) as e:
            raise StartupError(str(e)) from None
    else:
        client_filters = []

    if cfg.server_auth:
        services.server_secrets = _load_secrets(cfg.server_auth, "--server-auth")
        services.server_auth = _server_auth(services.server_secrets, cfg, "--server-auth")
    if cfg.pop_auth:
        services.pop_secrets = _load_secrets(cfg.pop_auth, "--pop-auth")
        services.pop_auth = _server_auth(services.pop_secrets, cfg, "--pop-auth")
    client_secret = None
    if cfg.client_auth:
        holder = _load_secrets(cfg.client_auth, "--client-auth")
        client_secret = holder.get().client_secret()
        if client_secret is None:
            raise StartupError("--client-auth: no client entry in %s" % cfg.client_auth)

    client_tls = None
    server_tls = cfg.server_tls or cfg.server_tls_connection
    client_tls_wanted = cfg.client_tls or cfg.client_tls_connection or cfg.client_tls_required
    if server_tls or client_tls_wanted:
        from . import tls
        try:
            if server_tls:
                services.tls_context = tls.server_context(cfg)
            if client_tls_wanted:
                client_tls = tls.client_context(cfg)
        except (OSError, ValueError) as e:
            raise StartupError("tls: %s" % e) from None

    if cfg.forward_to:
        from . import forwarder
        try:
            services.events = forwarder.Events()
            services.forwarder = forwarder.Forwarder(
                cfg, services.spool, client_filters=client_filters,
                client_secret=client_secret, tls_context=client_tls,
                events=services.events, stats=services.stats)
        except ValueError as e:
            raise StartupError("--forward-to: %s" % e) from None

    if not cfg.dont_serve:
        services.server = _listen(cfg, services)
    return services


def _listen(cfg, services):
    from . import net
    try:
        interfaces = net.parse_interfaces(cfg.interface)
    except ValueError as e:
        raise StartupError("--interface: %s" % e) from None
    server = net.Server(remote_clients=cfg.remote_clients,
                        max_connections=cfg.max_connections,
                        max_per_address=cfg.max_connections_per_address)
    try:
        if not cfg.no_smtp:
            from . import smtp_server
            implicit = services.tls_context if cfg.server_tls_connection else None
            server.add("smtp", interfaces, cfg.port,
                       lambda conn: smtp_server.SmtpSession(conn, services).run(),
                       tls_context=implicit,
                       busy_reply=b"421 4.3.2 too many connections, try again later\r\n")
        if cfg.pop:
            from . import pop_server
            server.add("pop", interfaces, cfg.pop_port,
                       lambda conn: pop_server.PopSession(conn, services).run(),
                       busy_reply=b"-ERR too many connections\r\n")
        if cfg.admin:
            from . import admin
            server.add("admin", interfaces, cfg.admin,
                       lambda conn: admin.AdminSession(conn, services).run(),
                       busy_reply=b"too many connections\r\n")
    except (OSError, ValueError) as e:
        for lst in server.listeners:
            lst.sock.close()
        raise StartupError(str(e.strerror if isinstance(e, OSError) and e.strerror else e)) from None
    if services.forwarder is not None and cfg.forward_on_disconnect:
        server.on_close.append(lambda kind: kind == "smtp" and services.forwarder.trigger())
    return server


def _run(cfg, services):
    """Daemonises, drops privileges, starts forwarding and serves until stopped."""
    from . import log, process
    try:
        services.spool.recover()
    except OSError as e:
        log.error("cannot read spool directory %s: %s" % (cfg.spool_dir, e))
        return EXIT_FAILURE
    if cfg.dont_serve:
        return _run_client(cfg, services)
    server = services.server
    try:
        _check_user(cfg)
    except StartupError as e:
        log.error(str(e))
        return EXIT_FAILURE
    _preload(cfg)
    process.set_umask()
    try:
        if not cfg.no_daemon:
            process.daemonise(cfg.pid_file)
        elif cfg.pid_file:
            process.write_pid_file(cfg.pid_file)
    except process.ProcessError as e:
        log.error(str(e))
        return EXIT_FAILURE
    try:
        try:
            process.switch_user(cfg.user)
        except process.ProcessError as e:
            log.error(str(e))
            return EXIT_FAILURE
        signals = process.Signals(wakeup_fd=server.wakeup_fd())
        stop = services.stop_event
        for kind, address in server.addresses():
            log.info("%s server on %s" % (kind, address))
        if cfg.close_stderr:
            log.close_stderr()
        if services.forwarder is not None:
            services.forwarder.start(initial=cfg.forward)
        process.notify_ready()

        def on_wake():
            if signals.stop.is_set():
                stop.set()
            if signals.hup.is_set():
                signals.hup.clear()
                _reload(services)

        def watch_stop():
            stop.wait()
            server.wake()
        threading.Thread(target=watch_stop, name="stop watcher", daemon=True).start()
        server.serve(stop, on_wake=on_wake)
        log.info("stopping")
        if services.forwarder is not None:
            services.forwarder.stop()
        return EXIT_OK
    finally:
        if cfg.pid_file:
            process.remove_pid_file(cfg.pid_file)


def _switching_user(cfg):
    return os.geteuid() == 0 and cfg.user and cfg.user != "root"


def _check_user(cfg):
    """Checks, before daemonising, that --user exists and can write the spool.

    The check runs in a short-lived child that really switches user, so what
    it finds is what the daemon will find; a failure here still reaches the
    caller's terminal and exit status.
    """
    if not _switching_user(cfg):
        if not os.access(cfg.spool_dir, os.W_OK | os.X_OK):
            raise StartupError("spool directory %s is not writable" % cfg.spool_dir)
        return
    import pwd
    try:
        pwd.getpwnam(cfg.user)
    except KeyError:
        raise StartupError("--user: no such user: %s" % cfg.user) from None
    from . import process
    pid = os.fork()
    if pid == 0:
        try:
            process.switch_user(cfg.user)
            ok = os.access(cfg.spool_dir, os.W_OK | os.X_OK)
        except Exception:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise StartupError("spool directory %s is not writable by user %s (see --user)"
                           % (cfg.spool_dir, cfg.user))


# Standard-library modules that parts of the program import only when first
# used, by the configuration that uses them.
_LAZY_MODULES = {
    "filters": ["selectors", "signal", "subprocess", "shlex"],
    "forward": ["smtplib", "select", "emailrelay.forwarder", "emailrelay.smtp_client",
                "emailrelay.socks", "emailrelay.sasl", "emailrelay.filters"],
    "tls": ["ssl", "emailrelay.tls"],
    "auth": ["emailrelay.sasl", "emailrelay.pam", "ctypes", "ctypes.util", "hmac"],
    "syslog": ["syslog"],
    "always": ["encodings.idna", "encodings.latin_1", "encodings.ascii", "encodings.utf_8"],
}


def _preload(cfg):
    """Imports what this configuration will need while still privileged.

    After --user drops root, the interpreter's own library may no longer be
    readable (a Python installed under /root, say), and a module first
    imported then would fail in the middle of a session.
    """
    if not _switching_user(cfg):
        return
    import importlib
    wanted = ["always"]
    if cfg.filter or cfg.client_filter or cfg.address_verifier:
        wanted.append("filters")
    if cfg.forward_to:
        wanted.append("forward")
    if cfg.server_tls or cfg.server_tls_connection or cfg.client_tls or cfg.client_tls_connection \
            or cfg.client_tls_required:
        wanted.append("tls")
    if cfg.server_auth or cfg.pop_auth or cfg.client_auth:
        wanted.append("auth")
    if cfg.log and (not cfg.no_syslog or cfg.syslog):
        wanted.append("syslog")
    for group in wanted:
        for name in _LAZY_MODULES[group]:
            try:
                importlib.import_module(name)
            except ImportError:
                pass


def _run_client(cfg, services):
    """--as-client / --dont-serve: forward once and exit with the outcome."""
    from . import log
    if services.forwarder is None:
        return EXIT_OK
    ok = services.forwarder.run_once()
    if not ok:
        log.error("forwarding failed: not every message was forwarded")
    return EXIT_OK if ok else EXIT_FAILURE


def _reload(services):
    """SIGHUP: reopen the log file and re-read the secrets files."""
    from . import log
    log.reopen()
    for holder in (services.server_secrets, services.pop_secrets):
        if holder is None or isinstance(holder, str):
            continue
        try:
            holder.reload()
            log.info("re-read secrets file %s" % holder.path)
        except Exception as e:
            log.error("cannot re-read secrets file: %s (keeping the old one)" % e)
