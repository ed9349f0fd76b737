"""The command-line and config-file parser, and the interpreters of option values.

`parse(argv)` returns a `Config` or raises `UsageError` with a one-line
message; nothing is started or written before parsing succeeds. The rows
it reads are `option_table.OPTIONS`. `smtp_config`, `proxy_protocol` and
`anonymous_scopes` interpret option values for the rest of the program.
"""

import os
import socket

from ..util import addresses, smtp_controls
from .option_table import (ANONYMOUS_SCOPES, AUTH_CONFIG_KEYS, BY_NAME, BY_SHORT, DEFAULT_CA,
                           IMPLIED, OPTIONS, PAM_PATH, SYSLOG_FACILITIES, TLS_VERSIONS)


class UsageError(Exception):
    """A bad command line or config file; the message is one line."""


# Notes logged (verbose) at start-up for options accepted but without effect.
_NO_EFFECT = {
    "hidden": "--hidden: Windows only, ignored",
    "localedir": "--localedir: no message catalogues in this version, ignored",
}


def default_domain():
    """The default --domain: this host's name (may use DNS: parse() asks once).

    The fully qualified name (socket.getfqdn()) unless it is only
    localhost, else the host name, else the address literal of the
    interface that outgoing connections use (such as `[192.0.2.2]`), else
    `localhost`; `domain_is_localhost()` then says so.
    """
    for name in (socket.getfqdn(), socket.gethostname()):
        if name and not _is_localhost(name):
            return name
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # connect() on a datagram socket sends nothing: it only picks
            # the route, and so the outgoing address.
            s.connect(("192.0.2.1", 25))
            address = s.getsockname()[0]
        if address and not address.startswith("127."):
            return "[%s]" % address
    except OSError:
        pass
    return "localhost"


def _is_localhost(name):
    name = name.lower().rstrip(".")
    return name in ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback") \
        or name.startswith("localhost.")


def domain_is_localhost(name):
    """True when a --domain value names no host but this one's loopback.

    A default --domain of that kind (or an address literal chosen because
    the host's name is localhost) deserves a warning: a next hop may refuse
    it in EHLO.
    """
    return _is_localhost(name) or name.startswith("[")


def app_dir():
    """What '@app' in a file name stands for: the directory holding the program.

    That is the directory of the source tree, or of the zipapp file.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.dirname(root) if os.path.isfile(root) else root


class Config:
    """The parsed options, as attributes named with underscores; read-only.

    `cfg.spool_dir`, `cfg.port` (int), `cfg.filter` (a list). A flag not
    given is False; a value option not given is its default (None, or [] for
    a repeatable option); `cfg.domain` not given is `default_domain()`.
    `cfg.config_file` is the config file or None; `cfg.notes` lists
    remarks worth logging at start-up.

    Values the parser had to interpret to check them are kept as it read
    them, so that nothing parses an option twice: `forward_address` (host,
    port, SOCKS host, SOCKS port; None without --forward-to),
    `server_features` and `client_features` (the --xxx-smtp-config
    keywords, defaults included), `anonymous_scopes`, `proxy_from`,
    `test_ip`, `max_load_limit` and `tarpit_steps` (None when not given).
    """

    def __init__(self, values, given, config_file=None, notes=()):
        self.__dict__.update(values)
        self.__dict__.update(_given=frozenset(given), config_file=config_file,
                             notes=list(notes))

    def __setattr__(self, name, value):
        raise AttributeError("options are read-only (%s)" % name)

    def given(self, name):
        """True when the option (long name, dashes or underscores) was given or implied."""
        return name.replace("_", "-") in self._given


def _did_you_mean(name, dashes):
    """` (did you mean --spool-dir?)` for a mistyped option name, or ''."""
    # Only a mistyped option needs difflib: imported here so that a good
    # command line does not pay for it at start-up.
    import difflib
    key = name.lower().replace("_", "-")
    close = [key] if key in BY_NAME else difflib.get_close_matches(key, BY_NAME, 1, 0.8)
    return " (did you mean %s%s?)" % (dashes, close[0]) if close else ""


def _one_line(text):
    return text if text.isprintable() else repr(text)


def _convert(opt, text, where=""):
    """Turns option text into its value; raises UsageError."""
    name = "--" + opt.name
    kind = opt.kind
    if kind in ("str", "path", "program"):
        if text == "" and kind != "str":
            raise UsageError("%s%s: empty value" % (where, name))
        if kind in ("path", "program") and text.startswith("@app"):
            text = app_dir() + text[4:]
        if kind == "path" and text not in (PAM_PATH, DEFAULT_CA):
            text = os.path.abspath(text)
        return text
    if kind == "port":
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise UsageError("%s%s: invalid port number %s (1 to 65535)"
                             % (where, name, _one_line(text)))
        return int(text)
    if kind == "int":
        if not text.isdigit():
            raise UsageError("%s%s: invalid number %s" % (where, name, _one_line(text)))
        value = int(text)
        if value < opt.minimum:
            raise UsageError("%s%s: %d is too small (at least %d)"
                             % (where, name, value, opt.minimum))
        return value
    if kind == "time":
        try:
            value = int(text) if text.isdigit() else float(text)
        except ValueError:
            value = -1
        if not 0 <= value < float("inf") or text.strip() != text or not text:
            raise UsageError("%s%s: invalid time in seconds %s" % (where, name, _one_line(text)))
        return value
    if kind == "optional":
        if text is None:
            return True
        if text == "":
            raise UsageError("%s%s: empty value" % (where, name))
        return text
    raise AssertionError(kind)


DEFAULT_POP_AUTH = "/etc/emailrelay.auth"


class _Collector:
    """Accumulates option values in order, checking repetition."""

    def __init__(self):
        self.values = {}
        self.given = []

    def add(self, opt, text, where=""):
        if opt.kind == "flag":
            if text is not None:
                raise UsageError("%s--%s: takes no value" % (where, opt.name))
            self.values[opt.name] = True
        else:
            value = _convert(opt, text, where)
            if opt.multi:
                self.values.setdefault(opt.name, []).append(value)
            elif opt.name in self.values and self.values[opt.name] != value:
                raise UsageError("%s--%s: given more than once with different values"
                                 % (where, opt.name))
            else:
                self.values[opt.name] = value
        if opt.name not in self.given:
            self.given.append(opt.name)


def _parse_argv(argv, out):
    """Parses command-line arguments into `out`; returns the positional arguments."""
    positional = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional.extend(argv[i:])
            break
        if arg.startswith("--"):
            name, eq, text = arg[2:].partition("=")
            opt = BY_NAME.get(name)
            if opt is None:
                raise UsageError("unknown option: --%s%s"
                                 % (_one_line(name), _did_you_mean(name, "--")))
            if not eq:
                text = None
                if opt.kind not in ("flag", "optional"):
                    if i >= len(argv):
                        raise UsageError("--%s: missing value" % name)
                    text = argv[i]
                    i += 1
            out.add(opt, text)
        elif arg.startswith("-") and arg != "-":
            letters = arg[1:]
            while letters:
                letter, letters = letters[0], letters[1:]
                opt = BY_SHORT.get(letter)
                if opt is None:
                    raise UsageError("unknown option: -%s" % _one_line(letter))
                if opt.kind in ("flag", "optional"):
                    out.add(opt, None)
                    continue
                if letters:
                    text, letters = letters, ""
                elif i < len(argv):
                    text = argv[i]
                    i += 1
                else:
                    raise UsageError("-%s (--%s): missing value" % (letter, opt.name))
                out.add(opt, text)
        else:
            positional.append(arg)
    return positional


def _parse_file(path, out):
    """Applies a config file: `name value` or a flag name alone, one per line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError("cannot read config file %s: %s" % (path, e.strerror or e)) from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = "%s:%d: " % (path, number)
        parts = line.split(None, 1)
        name = parts[0]
        text = parts[1].strip() if len(parts) > 1 else None
        if text is None and "=" in name:
            name, _, text = name.partition("=")
        if name.startswith("-"):
            raise UsageError("%swrite the option name without dashes: %s"
                             % (where, _one_line(name)))
        opt = BY_NAME.get(name)
        if opt is None:
            raise UsageError("%sunknown option: %s%s" % (where, _one_line(name),
                                                         _did_you_mean(name, "")))
        if text is None and opt.kind not in ("flag", "optional"):
            raise UsageError("%s%s: missing value" % (where, name))
        out.add(opt, text, where)


def parse(argv):
    """Parses the arguments (without the program name) and returns a Config.

    Applies the config file (the one positional argument), the implied
    options of --as-server/--as-client/--as-proxy, the defaults and the
    checks for contradictions. Raises UsageError with a one-line message.
    """
    out = _Collector()
    positional = _parse_argv(list(argv), out)
    config_file = None
    if len(positional) > 1:
        raise UsageError("too many arguments: %s" % _one_line(" ".join(positional[1:])))
    if positional:
        config_file = os.path.abspath(positional[0])
        _parse_file(config_file, out)
    values = out.values
    if values.get("help") or values.get("version"):
        # Help and version need nothing else to be right.
        return _make_config(values, out.given, config_file, {})
    _apply_implied(out)
    parsed = _check(values)
    if "domain" not in values:
        parsed["domain"] = default_domain()
    if values.get("pop") and "pop-auth" not in values:
        # E-MailRelay before 2.6 read this file, and the user guide's
        # "emailrelay --pop --no-smtp" relies on it; 2.6 refuses to start.
        values["pop-auth"] = DEFAULT_POP_AUTH
    return _make_config(values, out.given, config_file, parsed)


def _apply_implied(out):
    modes = [m for m in ("as-server", "as-client", "as-proxy") if m in out.values]
    if len(modes) > 1:
        raise UsageError("--%s and --%s cannot be used together" % (modes[0], modes[1]))
    for mode in modes:
        for name in IMPLIED[mode]:
            out.add(BY_NAME[name], None)
        if mode != "as-server":
            address = out.values[mode]
            if out.values.get("forward-to", address) != address:
                raise UsageError("--%s and --forward-to give different servers" % mode)
            out.add(BY_NAME["forward-to"], address)


def _check(v):
    """Raises UsageError for contradictions and malformed values.

    Returns the values it had to interpret to check them, parsed once for
    the rest of the program (see `Config`).
    """
    parsed = {}

    def need(option, required):
        if option in v and required not in v:
            raise UsageError("--%s needs --%s" % (option, required))

    for option in ("forward", "forward-on-disconnect", "poll", "immediate"):
        need(option, "forward-to")
    need("server-tls", "server-tls-certificate")
    need("server-tls-connection", "server-tls-certificate")
    if v.get("client-tls") and v.get("client-tls-connection"):
        raise UsageError("--client-tls and --client-tls-connection cannot be used together")
    need("pop-by-name", "pop")
    need("pop-no-delete", "pop")
    need("admin-terminate", "admin")
    if v.get("immediate") and int(v.get("workers", 1)) > 1:
        raise UsageError("--immediate cannot be used with --workers more than 1 (a worker "
                         "cannot wait for the main process's forwarder)")
    if v.get("no-smtp") and v.get("immediate"):
        raise UsageError("--immediate needs the SMTP server (it cannot be used with --no-smtp)")
    for name in ("server-tls-certificate", "client-tls-certificate"):
        if len(v.get(name, ())) > 2:
            raise UsageError("--%s: give it once (key and certificate in one file) or twice "
                             "(key file, then certificate file)" % name)
    if "forward-to" in v:
        try:
            parsed["forward_address"] = addresses.parse_forward_to(v["forward-to"])
        except ValueError as e:
            raise UsageError("--forward-to: %s" % e) from None
    if "anonymous" in v and v["anonymous"] is not True:
        for scope in v["anonymous"].split(","):
            if scope.strip().lower() not in ANONYMOUS_SCOPES:
                raise UsageError("--anonymous: unknown scope %s (expected %s)"
                                 % (_one_line(scope), ", ".join(ANONYMOUS_SCOPES)))
    if "syslog" in v and v["syslog"] is not True:
        if v["syslog"].lower() not in SYSLOG_FACILITIES:
            raise UsageError("--syslog: unknown facility %s (expected %s)"
                             % (_one_line(v["syslog"]), ", ".join(SYSLOG_FACILITIES)))
    if "tls-config" in v:
        _check_tls_config(v["tls-config"])
    if "proxy-protocol" in v:
        if v.get("inetd") or v.get("bsmtp"):
            raise UsageError("--proxy-protocol cannot be used with --inetd or --bsmtp")
        try:
            parsed["proxy_from"] = proxy_protocol(v["proxy-protocol"])
        except ValueError as e:
            raise UsageError("--proxy-protocol: %s" % e) from None
    for name in ("server-auth-config", "client-auth-config"):
        if name in v:
            _check_auth_config(name, v[name])
    for name, keywords, attr in (("server-smtp-config", SERVER_SMTP_KEYWORDS, "server_features"),
                                 ("client-smtp-config", CLIENT_SMTP_KEYWORDS, "client_features")):
        if name in v:
            try:
                parsed[attr] = smtp_config(v[name], keywords)
            except ValueError as e:
                raise UsageError("--%s: %s" % (name, e)) from None
    parsed.update(_check_zmailer_options(v))
    return parsed


def _check_zmailer_options(v):
    """Checks the operating modes and controls that come from ZMailer's smtpserver.

    Returns the controls' parsed values (`test_ip`, `max_load_limit`,
    `tarpit_steps`) for those given.
    """
    if v.get("inetd") and v.get("bsmtp"):
        raise UsageError("--inetd and --bsmtp cannot be used together")
    for mode in ("inetd", "bsmtp"):
        if v.get(mode) and v.get("dont-serve"):
            raise UsageError("--%s cannot be used with --dont-serve or --as-client" % mode)
        if v.get(mode) and v.get("no-smtp"):
            raise UsageError("--%s cannot be used with --no-smtp" % mode)
    if "test-address" in v and not (v.get("inetd") or v.get("bsmtp")):
        raise UsageError("--test-address needs --bsmtp or --inetd")
    if "server-auth-program" in v and "server-auth" in v:
        raise UsageError("--server-auth-program and --server-auth cannot be used together")
    checks = (("test-address", smtp_controls.parse_test_address, "test_ip"),
              ("max-load", smtp_controls.parse_max_load, "max_load_limit"),
              ("tarpit", smtp_controls.parse_tarpit, "tarpit_steps"))
    parsed = {}
    for name, check, attr in checks:
        if name in v:
            try:
                parsed[attr] = check(v[name])
            except ValueError as e:
                raise UsageError("--%s: %s" % (name, e)) from None
    for text in v.get("greeting", []):
        try:
            smtp_controls.check_greeting(text)
        except ValueError as e:
            raise UsageError("--greeting: %s" % e) from None
    return parsed


# --server-smtp-config and --client-smtp-config keywords and their defaults
# (E-MailRelay 2.6's, except client pipelining and our enhancedstatuscodes).
SERVER_SMTP_KEYWORDS = {"pipelining": True, "chunking": False, "smtputf8": False,
                        "smtputf8strict": False, "strictparsing": True, "alabels": True,
                        "enhancedstatuscodes": False,
                        # ZMailer smtpserver's switches (seed 004).
                        "dsn": True, "8bitmime": True, "etrn": True, "ehlo": True,
                        "force-rcpt-notify-never": False, "rcpt-dns-rbl": False,
                        "auth-login-also-without-tls": False}
CLIENT_SMTP_KEYWORDS = {"pipelining": True, "smtputf8strict": True, "eightbitstrict": False,
                        "binarymimestrict": True}
_SWITCH_PREFIXES = (("+", True), ("with-", True), ("without-", False), ("-", False),
                    ("no", False))


def smtp_config(value, keywords):
    """The {keyword: bool} an --xxx-smtp-config value gives; raises ValueError.

    `value` is the option's text or list of texts (None: all defaults).
    Each comma-separated item is a keyword, on by itself or with `+` or
    `with-`, off with `-`, `no` or `without-` (E-MailRelay's prefixes).
    """
    result = dict(keywords)
    texts = [value] if isinstance(value, str) else list(value or ())
    for text in texts:
        for item in text.split(","):
            word = item.strip().lower()
            if not word:
                continue
            on = True
            if word not in keywords:
                for prefix, state in _SWITCH_PREFIXES:
                    if word.startswith(prefix) and word[len(prefix):] in keywords:
                        word, on = word[len(prefix):], state
                        break
                else:
                    raise ValueError("unknown keyword %s (expected %s)"
                                     % (_one_line(item.strip()), ", ".join(sorted(keywords))))
            result[word] = on
    return result


def proxy_protocol(values):
    """{'smtp': [pattern, ...], 'pop': [...]} from --proxy-protocol values; raises ValueError.

    An item without a prefix applies to both servers; a server with no
    item is not in the result.
    """
    result = {}
    for value in values or ():
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            kinds = ("smtp", "pop")
            if "=" in item:
                prefix, _, item = item.partition("=")
                if prefix not in kinds:
                    raise ValueError("invalid prefix %s (expected smtp= or pop=)"
                                     % _one_line(prefix + "="))
                kinds = (prefix,)
            addresses.check_pattern(item)
            for kind in kinds:
                result.setdefault(kind, []).append(item)
    if values and not result:
        raise ValueError("no addresses")
    return result


def anonymous_scopes(value):
    """The set of --anonymous scopes in force for an option value.

    A bare `--anonymous` (True) means every scope; False or None means none.
    """
    if value is True:
        return set(ANONYMOUS_SCOPES)
    if not value:
        return set()
    return {s.strip().lower() for s in str(value).split(",") if s.strip()}


def _check_tls_config(text):
    for word in text.split(","):
        word = word.strip().lower()
        if word == "mbedtls":
            raise UsageError("--tls-config: mbedtls is not available (only openssl)")
        if word and word != "openssl" and word.lstrip("-") not in TLS_VERSIONS:
            raise UsageError("--tls-config: unknown keyword %s (expected openssl, tlsv1.x "
                             "or -tlsv1.x)" % _one_line(word))


def _check_auth_config(name, text):
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        key, colon, _ = item.partition(":")
        if not colon or key.strip().lower() not in AUTH_CONFIG_KEYS:
            raise UsageError("--%s: bad item %s (expected <key>:<mechanism-list> with key "
                             "m, x, a or d)" % (name, _one_line(item)))


def _make_config(values, given, config_file, parsed):
    attrs = {"forward_address": None, "proxy_from": {}, "test_ip": None,
             "max_load_limit": None, "tarpit_steps": None,
             "server_features": smtp_config(None, SERVER_SMTP_KEYWORDS),
             "client_features": smtp_config(None, CLIENT_SMTP_KEYWORDS),
             "anonymous_scopes": frozenset(anonymous_scopes(values.get("anonymous")))}
    attrs.update(parsed)
    notes = []
    for opt in OPTIONS:
        if opt.name in values:
            attrs[opt.attr] = values[opt.name]
        elif opt.kind in ("flag", "optional"):
            attrs[opt.attr] = False
        elif opt.multi:
            attrs[opt.attr] = []
        elif opt.name != "domain":
            attrs[opt.attr] = opt.default
    for name, note in _NO_EFFECT.items():
        if name in values:
            notes.append(note)
    return Config(attrs, given, config_file, notes)
