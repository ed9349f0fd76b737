"""Builds the program's parts from its options: spool, policy, auth, TLS, forwarder, listeners.

`services(cfg)` checks everything that can be checked before the process
starts serving (secrets files, filter and verifier programs, TLS
certificates, the forward-to address, listening addresses) and returns a
`Services` bundle; a problem is a `StartupError` with one clear line.
`new_server`, `add_sessions` and `forward_on_disconnect` also build a
--workers process's own listeners (see `modes`).
"""

import collections
import ipaddress
import os
import re
import shlex
import shutil
import threading

from .auth import auth_budget, pam, sasl, secrets
from .forward import events, forwarder
from .net import listen_sockets, listeners, tls
from .policy import auth_program, dnsbl, filters, smtp_policy, verifier
from .policy.filters import FILTER_ENV_PATH
from .runtime import log
from .server import admin, pop_server, smtp_server, smtp_settings
from .store import spool as spool_mod
from .util import parts
from .util.stats import Stats

# The counters of `services.stats` (the admin `status` command shows them).
STATS = ["messages-stored", "messages-rejected", "messages-forwarded", "messages-failed",
         "messages-deferred"]


class StartupError(Exception):
    """A configuration problem found before anything is started."""


class Services(parts.Parts):
    """The program's parts, as `services` makes them; sessions get narrow views.

    Attributes: `cfg`, `smtp_settings`, `pop_settings` and `admin_settings`
    (what the sessions take from `cfg`, made once), `spool`, `filters` (list), `verifier` (or None),
    `server_auth` (sasl.ServerAuth or None), `server_secrets`,
    `pop_auth`, `pop_secrets`, `tls_context` (server side, or None),
    `forwarder` (or None), `stats` (a stats.Stats), `events`
    (events.Events or None), `server` (listeners.Server), `stop_event`,
    `auth_budget` (auth_budget.FailureBudget shared by SMTP and POP, or None),
    `dnsbl` (dnsbl.Dnsbl or None), `load_guard` (smtp_policy.LoadGuard or
    None, --max-load), `help_text` (lines for HELP, --help-text),
    `worker_listeners` (with --workers above 1, the listeners.Server that holds the
    SMTP and POP sockets the workers serve, never served itself; else None),
    `programs` (the `Programs` the filter, verifier and auth-program options
    run, with absolute paths).
    """

    __slots__ = ("cfg", "smtp_settings", "pop_settings", "admin_settings", "spool", "filters",
                 "verifier", "server_auth", "server_secrets", "pop_auth", "pop_secrets",
                 "tls_context", "forwarder", "stats", "events", "server", "stop_event",
                 "auth_budget", "dnsbl", "load_guard", "help_text", "worker_listeners",
                 "programs")
    LISTS = ("filters", "help_text")

    def smtp(self):
        """What an SMTP session may use (smtp_server.SmtpServices)."""
        fwd = self.forwarder
        return smtp_server.SmtpServices(
            settings=self.smtp_settings, spool=self.spool, filters=self.filters,
            verifier=self.verifier, server_auth=self.server_auth, auth_budget=self.auth_budget,
            tls_context=self.tls_context, stats=self.stats, dnsbl=self.dnsbl,
            load_guard=self.load_guard, help_text=self.help_text, stop_event=self.stop_event,
            trigger=fwd.trigger if fwd is not None else None,
            rescan=fwd.rescan if fwd is not None else None,
            immediate=fwd.immediate_link if fwd is not None and self.cfg.immediate else None)

    def pop(self):
        """What a POP session may use (pop_server.PopServices)."""
        return pop_server.PopServices(settings=self.pop_settings, spool=self.spool,
                                      pop_auth=self.pop_auth, tls_context=self.tls_context,
                                      auth_budget=self.auth_budget, stop_event=self.stop_event)

    def admin(self, server):
        """What an admin session may use (admin.AdminServices); `server` has the listeners."""
        fwd = self.forwarder
        return admin.AdminServices(
            settings=self.admin_settings, spool=self.spool, stats=self.stats, events=self.events,
            flush=fwd.flush if fwd is not None else None,
            trigger=fwd.trigger if fwd is not None else None,
            listeners=lambda: (server.addresses(), server.live_count(), dict(server.counters)),
            stop_event=self.stop_event)


def _load_secrets(path, what):
    if path == secrets.PAM_PATH:
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
    without_tls = smtp and cfg.server_features["auth-login-also-without-tls"]
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


def services(cfg):
    """Checks the configuration and builds every part; raises StartupError."""
    services = Services(cfg=cfg, stop_event=threading.Event(),
                        smtp_settings=smtp_settings.SmtpSettings.from_config(cfg),
                        pop_settings=pop_server.PopSettings.from_config(cfg),
                        admin_settings=admin.AdminSettings.from_config(cfg))
    services.stats = Stats(STATS)

    if not os.path.isdir(cfg.spool_dir):
        raise StartupError("spool directory does not exist: %s" % cfg.spool_dir)
    services.spool = spool_mod.Spool(cfg.spool_dir)

    programs = services.programs = _resolve_programs(cfg)
    try:
        services.filters = [filters.make(s, cfg.filter_timeout) for s in programs.filters]
        client_filters = [filters.make(s, cfg.filter_timeout, kind="client")
                          for s in programs.client_filters]
        if programs.verifier:
            services.verifier = verifier.make(programs.verifier, cfg.filter_timeout)
    except ValueError as e:
        raise StartupError(str(e)) from None

    if cfg.dnsbl:
        try:
            services.dnsbl = dnsbl.Dnsbl.parse(
                cfg.dnsbl, check_local=os.environ.get("EMAILRELAY_DNSBL_CHECK_LOCAL") == "1")
        except ValueError as e:
            raise StartupError("--dnsbl: %s" % e) from None

    if cfg.server_auth:
        services.server_secrets = _load_secrets(cfg.server_auth, "--server-auth")
        services.server_auth = _server_auth(services.server_secrets, cfg, "--server-auth",
                                            smtp=True)
        check_server_secrets(services.server_secrets, "--server-auth")
    if programs.auth_program:
        if not os.access(programs.auth_program, os.X_OK):
            raise StartupError("--server-auth-program: cannot execute %s" % programs.auth_program)
        services.server_auth = _server_auth(
            auth_program.AuthProgram(programs.auth_program, cfg.filter_timeout), cfg,
            "--server-auth-program", smtp=True)
    _build_controls(cfg, services)
    if cfg.pop_auth:
        services.pop_secrets = _load_secrets(cfg.pop_auth, "--pop-auth")
        services.pop_auth = _server_auth(services.pop_secrets, cfg, "--pop-auth")
    if cfg.server_auth or cfg.pop_auth:
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
        try:
            if server_tls:
                services.tls_context = tls.server_context(cfg)
            if client_tls_wanted:
                client_tls = tls.client_context(cfg)
        except (OSError, ValueError) as e:
            raise StartupError("tls: %s" % _tls_error_text(e)) from None

    if cfg.forward_to:
        services.events = events.Events()
        services.forwarder = forwarder.Forwarder(
            cfg, services.spool, client_filters=client_filters,
            client_secret=client_secret, tls_context=client_tls,
            events=services.events, stats=services.stats)
        _check_forward_to(cfg.forward_to, cfg.forward_address[0])

    if not (cfg.dont_serve or cfg.inetd or cfg.bsmtp):
        services.server = _listen(cfg, services)
    return services


def _build_controls(cfg, services):
    """The SMTP server controls that need more than the option value (ZMailer's)."""
    if cfg.max_load is not None:
        services.load_guard = smtp_policy.LoadGuard(cfg.max_load_limit)
    if cfg.help_text:
        try:
            services.help_text = smtp_policy.load_help_text(cfg.help_text)
        except ValueError as e:
            raise StartupError("--help-text: %s" % e) from None


def _listen(cfg, services):
    """Binds every listener; with --workers above 1, SMTP and POP go to worker_listeners."""
    try:
        interfaces = listen_sockets.parse_interfaces(cfg.interface)
    except ValueError as e:
        raise StartupError("--interface: %s" % e) from None
    for kind, items in listen_sockets.systemd_sockets().items():
        interfaces.setdefault(kind, []).extend(items)
    server = new_server(cfg)
    # Workers serve SMTP and POP; with neither there is nothing for them.
    workers = cfg.workers > 1 and (not cfg.no_smtp or cfg.pop)
    shared = new_server(cfg) if workers else server
    try:
        add_sessions(shared, cfg, services, interfaces)
        if cfg.admin:
            handler, conversation = _served(admin.AdminSession, services.admin(server))
            server.add("admin", interfaces, cfg.admin, handler, conversation=conversation,
                       busy_reply=b"too many connections\r\n")
    except (OSError, ValueError) as e:
        for lst in server.listeners + (shared.listeners if shared is not server else []):
            lst.sock.close()
        raise StartupError(str(e.strerror if isinstance(e, OSError) and e.strerror else e)) from None
    if shared is not server:
        services.worker_listeners = shared
    else:
        forward_on_disconnect(server, services)
    return server


def new_server(cfg):
    return listeners.Server(remote_clients=cfg.remote_clients,
                            max_connections=cfg.max_connections,
                            max_per_address=cfg.max_connections_per_address,
                            backlog=cfg.listen_backlog,
                            proxy_timeout=cfg.proxy_protocol_timeout)


def add_sessions(server, cfg, services, interfaces):
    """Adds the SMTP and POP listeners (what workers serve) to `server`."""
    proxy_from = cfg.proxy_from
    if not cfg.no_smtp:
        handler, conversation = _served(smtp_server.SmtpSession, services.smtp())
        implicit = services.tls_context if cfg.server_tls_connection else None
        server.add("smtp", interfaces, cfg.port, handler, conversation=conversation,
                   tls_context=implicit,
                   # ZMailer's MaxParallelConnections reply (seed 004): the
                   # limit comes from there, E-MailRelay 2.6 has none.
                   busy_reply=smtp_settings.reply_bytes(
                       services.smtp_settings, "450 4.3.2 Too many simultaneous connections"),
                   address_busy_reply=smtp_settings.reply_bytes(
                       services.smtp_settings, "450 4.7.0 too many connections from your address"),
                   refused_reply=smtp_settings.reply_bytes(
                       services.smtp_settings, "554 5.7.1 no SMTP service for your address"),
                   proxy_from=proxy_from.get("smtp"))
    if cfg.pop:
        handler, conversation = _served(pop_server.PopSession, services.pop())
        server.add("pop", interfaces, cfg.pop_port, handler, conversation=conversation,
                   busy_reply=b"-ERR too many connections\r\n",
                   refused_reply=b"-ERR no POP service for your address\r\n",
                   proxy_from=proxy_from.get("pop"))


def _served(session_class, session_services):
    """(handler, conversation) for `Server.add` to serve sessions of `session_class`.

    The handler runs a whole session in its thread; the conversation, for
    the session loop, is None for a class that declares THREAD_ONLY (its
    handlers block inline), so such sessions always get a thread.
    """
    def handler(conn):
        session_class(conn, session_services).run()

    def conversation(conn):
        return session_class(conn, session_services)
    return handler, None if session_class.THREAD_ONLY else conversation


def forward_on_disconnect(server, services):
    if services.forwarder is not None and services.cfg.forward_on_disconnect:
        server.on_close.append(lambda kind: kind == "smtp" and services.forwarder.trigger())


# Program specs that are not a path to run.
_SPECIAL_PROGRAMS = ("exit:", "net:", "spam:", "spam-edit:")


# The programs the options name, as they will be run (see _resolve_programs).
Programs = collections.namedtuple("Programs", "filters client_filters verifier auth_program")


def _resolve_programs(cfg):
    """The filter, verifier and auth-program specs with absolute program paths.

    They are resolved against the start-up directory, before daemonising
    changes it to /. The `exit:`, `net:` and `spam:` forms are left alone;
    a program that is not there or not executable is a start-up error.
    """
    def one(spec, option):
        return _resolve_program(spec, option) if spec else None
    return Programs([_resolve_program(s, "--filter") for s in cfg.filter or []],
                    [_resolve_program(s, "--client-filter") for s in cfg.client_filter or []],
                    one(cfg.address_verifier, "--address-verifier"),
                    one(cfg.server_auth_program, "--server-auth-program"))


def _resolve_program(spec, option):
    text = spec.strip()
    if not text or text.startswith(_SPECIAL_PROGRAMS):
        return spec
    try:
        program = shlex.split(text)[0]
    except (ValueError, IndexError):
        return spec  # filters.make() reports the syntax error
    path = program
    if "/" not in program:
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


def program_paths(programs):
    """(spec, absolute path) of each program a `Programs` will run."""
    specs = programs.filters + programs.client_filters + \
        [s for s in (programs.verifier, programs.auth_program) if s]
    for spec in specs:
        text = spec.strip()
        if text.startswith(_SPECIAL_PROGRAMS):
            continue
        program = shlex.split(text)[0]
        if os.path.isabs(program):
            yield spec, program


def check_server_secrets(holder, option):
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


def _check_forward_to(value, host):
    """Refuses a --forward-to `host` that is neither an address nor a host name."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise StartupError("--forward-to %s: invalid address" % value) from None
    elif not re.match(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?$", host):
        raise StartupError("--forward-to %s: invalid host name" % value)
