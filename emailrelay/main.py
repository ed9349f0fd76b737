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

import codecs
import os
import signal
import sys
import threading

from .util import parts

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# The counters of `services.stats` (the admin `status` command shows them).
STATS = ["messages-stored", "messages-rejected", "messages-forwarded", "messages-failed",
         "messages-deferred"]


class StartupError(Exception):
    """A configuration problem found before anything is started."""


class Services(parts.Parts):
    """The program's parts, as `_build` makes them; sessions get narrow views.

    Attributes: `cfg`, `spool`, `filters` (list), `verifier` (or None),
    `server_auth` (sasl.ServerAuth or None), `server_secrets`,
    `pop_auth`, `pop_secrets`, `tls_context` (server side, or None),
    `forwarder` (or None), `stats` (a stats.Stats), `events`
    (forwarder.Events or None), `server` (listeners.Server), `stop_event`,
    `auth_budget` (auth_budget.FailureBudget shared by SMTP and POP, or None),
    `dnsbl` (dnsbl.Dnsbl or None), `load_guard` (smtp_policy.LoadGuard or
    None, --max-load), `help_text` (lines for HELP, --help-text),
    `worker_listeners` (with --workers above 1, the listeners.Server that holds the
    SMTP and POP sockets the workers serve, never served itself; else None).
    """

    __slots__ = ("cfg", "spool", "filters", "verifier", "server_auth", "server_secrets",
                 "pop_auth", "pop_secrets", "tls_context", "forwarder", "stats", "events",
                 "server", "stop_event", "auth_budget", "dnsbl", "load_guard", "help_text",
                 "worker_listeners")
    LISTS = ("filters", "help_text")

    def smtp(self):
        """What an SMTP session may use (smtp_server.SmtpServices)."""
        from .server import smtp_server
        fwd = self.forwarder
        return smtp_server.SmtpServices(
            cfg=self.cfg, spool=self.spool, filters=self.filters, verifier=self.verifier,
            server_auth=self.server_auth, auth_budget=self.auth_budget,
            tls_context=self.tls_context, stats=self.stats, dnsbl=self.dnsbl,
            load_guard=self.load_guard, help_text=self.help_text, stop_event=self.stop_event,
            trigger=fwd.trigger if fwd is not None else None,
            rescan=fwd.rescan if fwd is not None else None,
            immediate=fwd.immediate_session if fwd is not None and self.cfg.immediate else None)

    def pop(self):
        """What a POP session may use (pop_server.PopServices)."""
        from .server import pop_server
        return pop_server.PopServices(cfg=self.cfg, spool=self.spool, pop_auth=self.pop_auth,
                                      tls_context=self.tls_context,
                                      auth_budget=self.auth_budget, stop_event=self.stop_event)

    def admin(self, server):
        """What an admin session may use (admin.AdminServices); `server` has the listeners."""
        from .server import admin
        fwd = self.forwarder
        return admin.AdminServices(
            cfg=self.cfg, spool=self.spool, stats=self.stats, events=self.events,
            flush=fwd.flush if fwd is not None else None,
            trigger=fwd.trigger if fwd is not None else None,
            listeners=lambda: (server.addresses(), server.live_count(), dict(server.counters)),
            stop_event=self.stop_event)


# What makes a process forward by itself (--as-client and --as-proxy imply
# one); the admin interface's flush counts as the site's own trigger.
_FORWARDING_TRIGGERS = ("forward", "forward-on-disconnect", "poll", "immediate", "dont-serve",
                        "admin")


def run(argv=None):
    """Runs the program with `argv` (default sys.argv[1:]); returns the exit status."""
    from .config import options, usage
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
    from .runtime import log
    try:
        log.configure(cfg)
    except OSError as e:
        sys.stderr.write("emailrelay: error: cannot open log file %s: %s\n"
                         % (log.sanitise(e.filename or cfg.log_file), e.strerror or e))
        return EXIT_FAILURE
    for note in cfg.notes:
        log.verbose(note)
    if not cfg.given("domain") and options.domain_is_localhost(cfg.domain):
        log.warning("this host is only called localhost: using %s as --domain (the EHLO "
                    "name and greeting); set --domain to a name the next hop accepts"
                    % cfg.domain)
    try:
        app = _build(cfg)
    except StartupError as e:
        log.startup_error(str(e))
        return EXIT_FAILURE
    if cfg.forward_to and not any(cfg.given(o) for o in _FORWARDING_TRIGGERS):
        log.warning("--forward-to is given but nothing starts forwarding: messages wait in "
                    "the spool; add --forward-on-disconnect, --poll, --immediate or --forward "
                    "(or run --as-client from cron or an ip-up hook)")
    return _run(cfg, app)


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
        return EXIT_FAILURE


def _load_secrets(path, what):
    from .auth import secrets
    if path == secrets.PAM_PATH:
        from .auth import pam
        if not pam.available():
            raise StartupError("%s: PAM is not available on this system" % what)
        return path
    try:
        return secrets.Reloadable(path)
    except secrets.SecretsError as e:
        raise StartupError("%s: %s" % (what, e)) from None


def _server_auth(holder, cfg, what, smtp=False):
    """The sasl.ServerAuth for a secrets source (`smtp`: the SMTP server's, which
    --server-smtp-config auth-login-also-without-tls concerns); raises StartupError."""
    from .auth import sasl
    from .config import options
    from .runtime import log
    without_tls = smtp and options.smtp_config(
        cfg.server_smtp_config, options.SERVER_SMTP_KEYWORDS)["auth-login-also-without-tls"]
    if (smtp and not without_tls and not (cfg.server_tls or cfg.server_tls_connection)
            and (cfg.server_auth_program or cfg.server_auth == "/pam")):
        # Not an error (a site may add TLS later), but every MAIL would get 530.
        log.warning("%s: AUTH PLAIN and LOGIN are offered only over TLS and there is no "
                    "--server-tls: clients cannot authenticate; give --server-tls, or "
                    "--server-smtp-config auth-login-also-without-tls to offer them "
                    "without TLS" % what)
    try:
        # With --server-tls, PLAIN and LOGIN wait for STARTTLS/STLS (sasl.py).
        return sasl.ServerAuth(holder, cfg.server_auth_config, domain=cfg.domain,
                               tls_available=bool(cfg.server_tls), without_tls=without_tls)
    except ValueError as e:
        raise StartupError("%s: %s" % (what, e)) from None


def _build(cfg):
    """Checks the configuration and builds every part; raises StartupError."""
    from .store import spool as spool_mod
    services = Services(cfg=cfg, stop_event=threading.Event())
    from .util.stats import Stats
    services.stats = Stats(STATS)

    if not os.path.isdir(cfg.spool_dir):
        raise StartupError("spool directory does not exist: %s" % cfg.spool_dir)
    services.spool = spool_mod.Spool(cfg.spool_dir)

    if cfg.filter or cfg.client_filter or cfg.address_verifier:
        from .policy import filters, verifier
        _resolve_programs(cfg)
        try:
            services.filters = [filters.make(s, cfg.filter_timeout)
                                for s in cfg.filter or []]
            client_filters = [filters.make(s, cfg.filter_timeout, kind="client")
                              for s in cfg.client_filter or []]
            if cfg.address_verifier:
                services.verifier = verifier.make(cfg.address_verifier, cfg.filter_timeout)
        except ValueError as e:
            raise StartupError(str(e)) from None
    else:
        client_filters = []

    if cfg.dnsbl:
        from .policy import dnsbl
        try:
            services.dnsbl = dnsbl.Dnsbl.parse(
                cfg.dnsbl, check_local=os.environ.get("EMAILRELAY_DNSBL_CHECK_LOCAL") == "1")
        except ValueError as e:
            raise StartupError("--dnsbl: %s" % e) from None

    if cfg.server_auth:
        services.server_secrets = _load_secrets(cfg.server_auth, "--server-auth")
        services.server_auth = _server_auth(services.server_secrets, cfg, "--server-auth",
                                            smtp=True)
        _check_server_secrets(services.server_secrets, "--server-auth")
    if cfg.server_auth_program:
        from .policy import auth_program
        if not os.access(cfg.server_auth_program, os.X_OK):
            raise StartupError("--server-auth-program: cannot execute %s" % cfg.server_auth_program)
        services.server_auth = _server_auth(
            auth_program.AuthProgram(cfg.server_auth_program, cfg.filter_timeout), cfg,
            "--server-auth-program", smtp=True)
    _build_controls(cfg, services)
    if cfg.pop_auth:
        services.pop_secrets = _load_secrets(cfg.pop_auth, "--pop-auth")
        services.pop_auth = _server_auth(services.pop_secrets, cfg, "--pop-auth")
    if cfg.server_auth or cfg.pop_auth:
        from .auth import auth_budget
        services.auth_budget = auth_budget.FailureBudget()
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
        from .net import tls
        try:
            if server_tls:
                services.tls_context = tls.server_context(cfg)
            if client_tls_wanted:
                client_tls = tls.client_context(cfg)
        except (OSError, ValueError) as e:
            raise StartupError("tls: %s" % _tls_error_text(e)) from None

    if cfg.forward_to:
        from .forward import forwarder
        try:
            services.events = forwarder.Events()
            services.forwarder = forwarder.Forwarder(
                cfg, services.spool, client_filters=client_filters,
                client_secret=client_secret, tls_context=client_tls,
                events=services.events, stats=services.stats)
        except ValueError as e:
            raise StartupError("--forward-to: %s" % e) from None
        _check_forward_to(cfg.forward_to)

    if not (cfg.dont_serve or cfg.inetd or cfg.bsmtp):
        services.server = _listen(cfg, services)
    return services


def _build_controls(cfg, services):
    """The SMTP server controls that need more than the option value (ZMailer's)."""
    from .util import smtp_controls
    from .policy import smtp_policy
    if cfg.max_load is not None:
        services.load_guard = smtp_policy.LoadGuard(smtp_controls.parse_max_load(cfg.max_load))
    if cfg.help_text:
        try:
            services.help_text = smtp_policy.load_help_text(cfg.help_text)
        except ValueError as e:
            raise StartupError("--help-text: %s" % e) from None


def _listen(cfg, services):
    """Binds every listener; with --workers above 1, SMTP and POP go to worker_listeners."""
    from .net import listeners
    try:
        interfaces = listeners.parse_interfaces(cfg.interface)
    except ValueError as e:
        raise StartupError("--interface: %s" % e) from None
    for kind, items in listeners.systemd_sockets().items():
        interfaces.setdefault(kind, []).extend(items)
    server = _new_server(cfg)
    # Workers serve SMTP and POP; with neither there is nothing for them.
    workers = cfg.workers > 1 and (not cfg.no_smtp or cfg.pop)
    shared = _new_server(cfg) if workers else server
    try:
        _add_sessions(shared, cfg, services, interfaces)
        if cfg.admin:
            from .server import admin
            admin_services = services.admin(server)
            server.add("admin", interfaces, cfg.admin,
                       lambda conn: admin.AdminSession(conn, admin_services).run(),
                       busy_reply=b"too many connections\r\n")
    except (OSError, ValueError) as e:
        for lst in server.listeners + (shared.listeners if shared is not server else []):
            lst.sock.close()
        raise StartupError(str(e.strerror if isinstance(e, OSError) and e.strerror else e)) from None
    if shared is not server:
        services.worker_listeners = shared
    else:
        _forward_on_disconnect(server, services)
    return server


def _new_server(cfg):
    from .net import listeners
    return listeners.Server(remote_clients=cfg.remote_clients,
                            max_connections=cfg.max_connections,
                            max_per_address=cfg.max_connections_per_address,
                            backlog=cfg.listen_backlog,
                            proxy_timeout=cfg.proxy_protocol_timeout)


def _add_sessions(server, cfg, services, interfaces):
    """Adds the SMTP and POP listeners (what workers serve) to `server`."""
    from .config import options
    proxy_from = options.proxy_protocol(cfg.proxy_protocol)
    if not cfg.no_smtp:
        from .server import smtp_server
        smtp = services.smtp()
        implicit = services.tls_context if cfg.server_tls_connection else None
        server.add("smtp", interfaces, cfg.port,
                   lambda conn: smtp_server.SmtpSession(conn, smtp).run(),
                   conversation=lambda conn: smtp_server.SmtpSession(conn, smtp),
                   tls_context=implicit,
                   # ZMailer's MaxParallelConnections reply (seed 004): the
                   # limit comes from there, E-MailRelay 2.6 has none.
                   busy_reply=smtp_server.reply_bytes(
                       cfg, "450 4.3.2 Too many simultaneous connections"),
                   address_busy_reply=smtp_server.reply_bytes(
                       cfg, "450 4.7.0 too many connections from your address"),
                   refused_reply=smtp_server.reply_bytes(
                       cfg, "554 5.7.1 no SMTP service for your address"),
                   proxy_from=proxy_from.get("smtp"))
    if cfg.pop:
        from .server import pop_server
        pop = services.pop()
        server.add("pop", interfaces, cfg.pop_port,
                   lambda conn: pop_server.PopSession(conn, pop).run(),
                   busy_reply=b"-ERR too many connections\r\n",
                   refused_reply=b"-ERR no POP service for your address\r\n",
                   proxy_from=proxy_from.get("pop"))


def _forward_on_disconnect(server, services):
    if services.forwarder is not None and services.cfg.forward_on_disconnect:
        server.on_close.append(lambda kind: kind == "smtp" and services.forwarder.trigger())


# Program specs that are not a path to run.
_SPECIAL_PROGRAMS = ("exit:", "net:", "spam:", "spam-edit:")


def _resolve_programs(cfg):
    """Makes relative program paths in the filter/verifier options absolute.

    They are resolved against the start-up directory, before daemonising
    changes it to /. The `exit:`, `net:` and `spam:` forms are left alone;
    a program that is not there or not executable is a start-up error.
    """
    for option in ("filter", "client_filter"):
        values = getattr(cfg, option) or []
        values[:] = [_resolve_program(spec, "--" + option.replace("_", "-")) for spec in values]
    if cfg.address_verifier:
        cfg.address_verifier = _resolve_program(cfg.address_verifier, "--address-verifier")
    if cfg.server_auth_program:
        cfg.server_auth_program = _resolve_program(cfg.server_auth_program,
                                                   "--server-auth-program")


def _resolve_program(spec, option):
    import shlex
    text = spec.strip()
    if not text or text.startswith(_SPECIAL_PROGRAMS):
        return spec
    try:
        program = shlex.split(text)[0]
    except (ValueError, IndexError):
        return spec  # filters.make() reports the syntax error
    path = program
    if "/" not in program:
        import shutil  # (lazily, as the module docstring says: only filters need it)
        from .policy.filters import FILTER_ENV_PATH
        # A bare name is looked up as a shell would, on the start-up PATH
        # (where `make install` put emailrelay-filter-copy), then on the
        # PATH programs run with; a file of that name in the start-up
        # directory is E-MailRelay's meaning, kept as the last resort.
        found = shutil.which(program, path=os.pathsep.join(
            [os.environ.get("PATH", ""), FILTER_ENV_PATH]))
        if found is None and os.path.exists(program):
            found = program
        if found is None:
            raise StartupError("%s %s: no such program" % (option, spec))
        path = os.path.abspath(found)
    elif not os.path.isabs(program):
        path = os.path.abspath(program)
    if not os.path.isfile(path):
        raise StartupError("%s %s: no such program" % (option, spec))
    if not os.access(path, os.X_OK):
        raise StartupError("%s %s: not executable" % (option, spec))
    if path == program:
        return spec
    rest = text[len(program):] if text.startswith(program) else \
        " " + " ".join(shlex.quote(a) for a in shlex.split(text)[1:])
    return shlex.quote(path) + rest


def _program_paths(cfg):
    """The absolute program paths the filter, verifier and auth-program options will run."""
    import shlex
    specs = list(cfg.filter or []) + list(cfg.client_filter or []) + \
        ([cfg.address_verifier] if cfg.address_verifier else []) + \
        ([cfg.server_auth_program] if cfg.server_auth_program else [])
    for spec in specs:
        text = spec.strip()
        if text.startswith(_SPECIAL_PROGRAMS):
            continue
        program = shlex.split(text)[0]
        if os.path.isabs(program):
            yield spec, program


def _check_server_secrets(holder, option):
    """A --server-auth file with no accounts and no trusted addresses is refused.

    Every client would have to authenticate and none could: the relay would
    refuse all mail, which is never what the administrator meant.
    """
    if isinstance(holder, str):
        return
    secrets = holder.get()
    if not secrets.has_server() and not secrets.has_trusted():
        raise StartupError("%s %s: no server accounts and no trusted addresses (server lines): "
                           "every client would be refused" % (option, holder.path))


def _tls_error_text(e):
    if isinstance(e, OSError) and e.filename:
        return "%s: %s" % (e.filename, e.strerror or e)
    return str(e)


def _check_forward_to(value):
    """Refuses a --forward-to host that is neither an address nor a host name."""
    import ipaddress
    import re
    from .util import addresses
    host = addresses.parse_forward_to(value)[0]
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise StartupError("--forward-to %s: invalid address" % value) from None
    elif not re.match(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?$", host):
        raise StartupError("--forward-to %s: invalid host name" % value)


def _run(cfg, services):
    """Daemonises, drops privileges, starts forwarding and serves until stopped."""
    from .runtime import log, process
    try:
        entry = process.user_entry(cfg.user)
    except process.ProcessError as e:
        log.startup_error(str(e))
        return EXIT_FAILURE
    _preload(cfg, entry)
    error = _preflight(cfg, entry)
    if error:
        log.startup_error(error)
        return EXIT_FAILURE
    if cfg.dont_serve:
        return _run_client(cfg, services)
    if cfg.inetd or cfg.bsmtp:
        return _run_stdio(cfg, services)
    server = services.server
    group = entry.pw_gid if entry is not None else None
    process.set_umask()
    try:
        if not cfg.no_daemon:
            process.daemonise(cfg.pid_file, group)
        elif cfg.pid_file:
            process.write_pid_file(cfg.pid_file, group)
    except process.ProcessError as e:
        log.startup_error(str(e))
        return EXIT_FAILURE
    try:
        if not _drop_privileges(cfg) or not _recover(cfg, services):
            return EXIT_FAILURE
        signals = process.Signals(wakeup_fd=server.wakeup_fd())
        shared = services.worker_listeners
        for kind, address in (shared.addresses() if shared else []) + server.addresses():
            log.info("%s server on %s" % (kind, address))
        if cfg.close_stderr:
            log.close_stderr()
        supervisor = None
        if shared is not None:
            from .runtime import workers
            # Forked before the forwarder's thread starts (and after the
            # switch to --user, which each worker keeps).
            supervisor = workers.Supervisor(
                cfg.workers, lambda channel: _run_worker(cfg, services, channel),
                forwarder=services.forwarder)
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
        return EXIT_OK
    finally:
        if cfg.pid_file:
            process.remove_pid_file(cfg.pid_file)


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
    from .runtime import log, process, workers
    from .util.stats import Stats
    process.forked_child()
    for lst in services.server.listeners:
        lst.sock.close()
    own = services.copy()
    own.stop_event = threading.Event()
    own.stats = Stats(STATS)
    own.events = None
    own.worker_listeners = None
    if services.forwarder is not None:
        own.forwarder = workers.ForwarderLink(channel)
    if services.auth_budget is not None:
        from .auth import auth_budget
        own.auth_budget = auth_budget.FailureBudget()
    own.server = _new_server(cfg)
    inherited = services.worker_listeners.listeners
    interfaces = {lst.kind: [] for lst in inherited}
    for lst in inherited:
        interfaces[lst.kind].append("fd#%d" % os.dup(lst.sock.fileno()))
        lst.sock.close()
    _add_sessions(own.server, cfg, own, interfaces)
    _forward_on_disconnect(own.server, own)
    signals = process.Signals(wakeup_fd=own.server.wakeup_fd())
    workers.watch_main(channel, own.stop_event.set)
    log.verbose("worker serving %s" % ", ".join(kind for kind in interfaces))
    _serve(own.server, own.stop_event, signals, lambda: _reload(own))


def _run_stdio(cfg, services):
    """--inetd / --bsmtp: one session on stdin and stdout, as --user, then exit.

    The spool is not recovered here: a daemon or forwarder may be working
    on it at the same time, and each inetd session is only one client.
    """
    from .runtime import process
    from .server import stdio_server
    process.set_umask()
    if not _drop_privileges(cfg):
        return EXIT_FAILURE
    return stdio_server.run(cfg, services.smtp())


def _drop_privileges(cfg):
    """Switches the effective ids to --user; False (logged) on failure."""
    from .runtime import log, process
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
    from .runtime import log
    try:
        services.spool.recover()
    except OSError as e:
        log.startup_error("cannot read spool directory %s: %s" % (cfg.spool_dir, e.strerror or e))
        return False
    return True


def _preflight(cfg, entry):
    """Checks, before daemonising, what the program will do as --user.

    Without a user switch: the spool must be writable. With one, a short-
    lived child switches like the daemon and checks that the programs it
    will run are executable by the user and that logging works; the error
    text is the real cause of a failure.
    """
    from .runtime import log, process
    if entry is None:
        if not os.access(cfg.spool_dir, os.W_OK | os.X_OK):
            return "spool directory %s is not writable" % cfg.spool_dir
        return None
    programs = list(_program_paths(cfg))

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
    import importlib
    import pkgutil
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
    from .runtime import log, process
    if services.forwarder is None:
        return EXIT_OK
    if not _drop_privileges(cfg) or not _recover(cfg, services):
        return EXIT_FAILURE
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
    return EXIT_OK if ok else EXIT_FAILURE


def _reload(services):
    """SIGHUP: reopen the log file and re-read the secrets files.

    Both happen in a root window, so that root-only (0600) secrets files and
    log files in root's directories still work after --user.
    """
    from .runtime import log, process
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
