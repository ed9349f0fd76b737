"""The option table and parser: every option in every form, implied options,
bad options, help and version text, and agreement with the man page."""

import os
import re
import subprocess
import sys

import pytest

from emailrelay.config import option_table, options, usage
from emailrelay.config.options import UsageError, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every option of the E-MailRelay man page (seed 002) with its short letter.
MAN_PAGE_OPTIONS = {
    "as-client": "q", "as-proxy": "y", "as-server": "d", "spool-dir": "s", "help": "h",
    "version": "V", "forward": "f", "forward-on-disconnect": "1", "forward-to": "o",
    "poll": "O", "client-filter": "Y", "client-interface": "6", "connection-timeout": "U",
    "idle-timeout": None, "response-timeout": "T", "forward-to-some": None,
    "immediate": "m", "port": "p", "remote-clients": "r", "address-verifier": None,
    "anonymous": "A", "dnsbl": None, "domain": "D", "filter": "z", "filter-timeout": "W",
    "interface": "I", "prompt-timeout": "w", "size": "M", "pop": "B", "pop-by-name": "J",
    "pop-no-delete": "G", "pop-port": "E", "admin": "a", "admin-terminate": "Q",
    "client-auth": "C", "client-auth-config": None, "server-auth": "S",
    "server-auth-config": None, "pop-auth": "F", "client-tls": "j",
    "client-tls-certificate": None, "client-tls-connection": "b",
    "client-tls-required": None, "client-tls-server-name": None, "client-tls-verify": None,
    "client-tls-verify-name": None, "server-tls": "K", "server-tls-certificate": None,
    "server-tls-connection": None, "server-tls-required": None, "server-tls-verify": None,
    "tls-config": "9", "dont-serve": "x", "hidden": "H", "localedir": None,
    "no-daemon": "t", "no-smtp": "X", "pid-file": "i", "user": "u", "verbose": "v",
    "log": "l", "debug": "g", "log-address": None, "log-file": "N", "log-time": "L",
    "no-syslog": "n", "syslog": "k", "close-stderr": "e",
}

NEW_OPTIONS = {"max-connections": 200, "max-connections-per-address": 20,
               "max-recipients": 1000, "max-bounce-recipients": 3, "max-bad-commands": None,
               "min-free-space": 1024, "min-data-rate": 500, "listen-backlog": 0, "workers": 1,
               "retry-interval": 60, "retry-max-interval": 3600, "retry-lifetime": 432000,
               "proxy-protocol": [], "proxy-protocol-timeout": 5}

# Options E-MailRelay 2.5 added that 2.6 command lines use, with their letters.
EMAILRELAY_25_OPTIONS = {"server-smtp-config": "Z", "client-smtp-config": "c"}

# ZMailer smtpserver's modes and controls (issue 10), with their defaults.
ZMAILER_OPTIONS = {"inetd": False, "bsmtp": False, "test-address": None, "max-load": None,
                   "tarpit": None, "helo-check": False, "greeting": [], "help-text": None,
                   "server-auth-program": None}

# A good value for each option that takes one.
SAMPLE = {
    "as-client": "smtp.example.com:25", "as-proxy": "smtp.example.com:25",
    "forward-to": "smtp.example.com:25", "spool-dir": "/tmp/spool", "poll": "30",
    "client-filter": "/usr/bin/true", "client-interface": "127.0.0.1",
    "connection-timeout": "5", "idle-timeout": "7", "response-timeout": "9", "port": "2525",
    "address-verifier": "/usr/bin/true", "domain": "relay.example.com",
    "dnsbl": "zen.example.org,1,2s",
    "filter": "exit:0", "filter-timeout": "11", "interface": "127.0.0.1",
    "prompt-timeout": "3", "size": "1000000", "pop-port": "1110", "admin": "10025",
    "client-auth": "/etc/client.auth", "client-auth-config": "m:cram-md5;x:plain",
    "server-auth": "/etc/server.auth", "server-auth-config": "m:;a:plain",
    "pop-auth": "/etc/pop.auth", "client-tls-certificate": "/etc/c.pem",
    "client-tls-server-name": "smtp.example.com", "client-tls-verify": "/etc/ca.pem",
    "client-tls-verify-name": "smtp.example.com", "server-tls-certificate": "/etc/s.pem",
    "server-tls-verify": "/etc/ca.pem", "tls-config": "tlsv1.2,-tlsv1.3", "localedir": "/usr/share",
    "pid-file": "/run/emailrelay.pid", "user": "nobody", "log-file": "/tmp/log.%d",
    "max-connections": "50", "listen-backlog": "512", "workers": "3",
    "max-connections-per-address": "5", "max-recipients": "100",
    "max-bounce-recipients": "1", "max-bad-commands": "3", "min-free-space": "0",
    "min-data-rate": "100",
    "retry-interval": "30", "retry-max-interval": "600", "retry-lifetime": "86400",
    "proxy-protocol": "smtp=10.0.0.1,pop=10.0.0.0/24", "proxy-protocol-timeout": "3",
    "test-address": "[192.0.2.1]", "max-load": "2.5", "tarpit": "1,2,30",
    "greeting": "%H ESMTP %V at %T %%", "help-text": "/etc/help.txt",
    "server-auth-program": "/usr/local/bin/check-password",
    "server-smtp-config": "+chunking,nopipelining", "client-smtp-config": "-pipelining",
}
OPTIONAL_SAMPLE = {"anonymous": "server,content", "syslog": "local0"}

# What an option needs beside it to be valid on its own.
NEEDS = {
    "forward": ["--forward-to", "h:25"], "forward-on-disconnect": ["--forward-to", "h:25"],
    "poll": ["--forward-to", "h:25"], "immediate": ["--forward-to", "h:25"],
    "server-tls": ["--server-tls-certificate", "/etc/s.pem"],
    "server-tls-connection": ["--server-tls-certificate", "/etc/s.pem"],
    "pop": ["--pop-auth", "/etc/pop.auth"],
    "pop-by-name": ["--pop", "--pop-auth", "/etc/pop.auth"],
    "pop-no-delete": ["--pop", "--pop-auth", "/etc/pop.auth"],
    "admin-terminate": ["--admin", "10025"],
    "test-address": ["--bsmtp"],
}

TESTABLE = list(option_table.OPTIONS)


def expected(opt, text):
    """The value the parser should give for `text`."""
    if opt.kind in ("port", "int", "time"):
        value = int(text)
    elif opt.kind == "path":
        value = os.path.abspath(text)
    else:
        value = text
    return [value] if opt.multi else value


def check(cfg, opt, text):
    if opt.name in ("help", "version"):
        assert getattr(cfg, opt.attr) is True
    elif opt.kind == "flag" or (opt.kind == "optional" and text is None):
        assert getattr(cfg, opt.attr) is True
    else:
        assert getattr(cfg, opt.attr) == expected(opt, text)
    assert cfg.given(opt.name)


def test_table_has_every_man_page_option_with_its_letter():
    table = {o.name: o.short for o in option_table.OPTIONS}
    for name, short in list(MAN_PAGE_OPTIONS.items()) + list(EMAILRELAY_25_OPTIONS.items()):
        assert name in table, name
        assert table[name] == short, name
    assert len(MAN_PAGE_OPTIONS) == 68
    assert set(table) == set(MAN_PAGE_OPTIONS) | set(NEW_OPTIONS) | set(ZMAILER_OPTIONS) \
        | set(EMAILRELAY_25_OPTIONS)


def test_table_rows_are_well_formed():
    shorts = [o.short for o in option_table.OPTIONS if o.short]
    assert len(shorts) == len(set(shorts))
    for opt in option_table.OPTIONS:
        assert opt.group in option_table.GROUPS
        assert opt.kind in option_table.KINDS
        assert opt.help.endswith("."), opt.name
        assert (opt.value is None) == (opt.kind == "flag"), opt.name
    for name, default in NEW_OPTIONS.items():
        assert option_table.BY_NAME[name].group == ("SMTP client" if name.startswith("retry-")
                                                    else "SMTP server")
        assert option_table.BY_NAME[name].short is None
        assert getattr(parse([]), name.replace("-", "_")) == default
    for name, default in ZMAILER_OPTIONS.items():
        assert option_table.BY_NAME[name].short is None
        assert "ZMailer" in option_table.BY_NAME[name].help, name
        assert getattr(parse([]), name.replace("-", "_")) == default


def test_defaults():
    cfg = parse([])
    assert (cfg.port, cfg.pop_port, cfg.idle_timeout, cfg.connection_timeout,
            cfg.response_timeout, cfg.filter_timeout) == (25, 110, 60, 40, 60, 60)
    assert cfg.spool_dir == "/var/spool/emailrelay"
    assert cfg.user == "daemon"
    assert cfg.filter == [] and cfg.interface == []
    assert cfg.forward_to is None and cfg.admin is None
    assert cfg.log is False and cfg.anonymous is False
    assert not cfg.given("port")
    assert cfg.config_file is None


def test_domain_default_is_looked_up_once_by_the_parser_and_not_for_help(monkeypatch):
    calls = []
    monkeypatch.setattr(options, "default_domain", lambda: calls.append(1) or "host.test")
    cfg = parse([])
    assert calls == [1]
    assert cfg.domain == "host.test" and cfg.domain == "host.test"
    assert calls == [1]
    assert parse(["--domain", "x.test"]).domain == "x.test"
    parse(["--help"])
    parse(["--version"])
    assert calls == [1]


def test_options_are_read_only_and_interpreted_values_come_parsed():
    cfg = parse(["--forward-to", "smtp.example.com:587@socks.test:1080", "--tarpit", "1,2,30",
                 "--client-smtp-config", "-pipelining", "--anonymous=vrfy"])
    with pytest.raises(AttributeError):
        cfg.forward_to = "elsewhere:25"
    assert cfg.forward_address == ("smtp.example.com", 587, "socks.test", 1080)
    assert cfg.tarpit_steps == (1.0, 2.0, 30.0)
    assert cfg.client_features["pipelining"] is False
    assert cfg.server_features == options.smtp_config(None, options.SERVER_SMTP_KEYWORDS)
    assert cfg.anonymous_scopes == {"vrfy"}
    assert parse([]).forward_address is None and parse([]).tarpit_steps is None


@pytest.mark.parametrize("opt", TESTABLE, ids=lambda o: o.name)
def test_every_option_long_forms(opt):
    needs = NEEDS.get(opt.name, [])
    if opt.kind == "flag":
        check(parse(["--" + opt.name] + needs), opt, None)
        return
    if opt.kind == "optional":
        check(parse(["--" + opt.name] + needs), opt, None)
        text = OPTIONAL_SAMPLE[opt.name]
        check(parse(["--%s=%s" % (opt.name, text)] + needs), opt, text)
        return
    text = SAMPLE[opt.name]
    check(parse(["--" + opt.name, text] + needs), opt, text)
    check(parse(["--%s=%s" % (opt.name, text)] + needs), opt, text)


@pytest.mark.parametrize("opt", [o for o in TESTABLE if o.short], ids=lambda o: o.name)
def test_every_option_short_forms(opt):
    needs = NEEDS.get(opt.name, [])
    flag = "-" + opt.short
    if opt.kind in ("flag", "optional"):
        check(parse([flag] + needs), opt, None)
        return
    text = SAMPLE[opt.name]
    check(parse([flag, text] + needs), opt, text)
    check(parse([flag + text] + needs), opt, text)


@pytest.mark.parametrize("opt", TESTABLE, ids=lambda o: o.name)
def test_every_option_in_a_config_file(opt, tmp_path):
    path = tmp_path / "emailrelay.conf"
    needs = NEEDS.get(opt.name, [])
    if opt.kind == "flag":
        text, line = None, opt.name
    elif opt.kind == "optional":
        text = OPTIONAL_SAMPLE[opt.name]
        line = "%s %s" % (opt.name, text)
    else:
        text = SAMPLE[opt.name]
        line = "%s   %s" % (opt.name, text)
    path.write_text("# a comment\n\n   %s\n" % line)
    cfg = parse(needs + [str(path)])
    check(cfg, opt, text)
    assert cfg.config_file == str(path)


def test_bundled_short_flags_and_value_at_the_end():
    cfg = parse(["-dvp", "2525", "-rs/tmp/q"])
    assert cfg.as_server and cfg.verbose and cfg.remote_clients
    assert cfg.port == 2525 and cfg.spool_dir == "/tmp/q"


def test_repeatable_options_collect_lists(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("filter exit:0\ninterface pop=127.0.0.2\n")
    cfg = parse(["--filter", "/bin/a", "-z", "/bin/b", "-I", "127.0.0.1,::1", str(conf)])
    assert cfg.filter == ["/bin/a", "/bin/b", "exit:0"]
    assert cfg.interface == ["127.0.0.1,::1", "pop=127.0.0.2"]
    cfg = parse(["--server-tls-certificate", "k.pem", "--server-tls-certificate", "c.pem"])
    assert cfg.server_tls_certificate == [os.path.abspath("k.pem"), os.path.abspath("c.pem")]


def test_paths_become_absolute_and_app_is_expanded():
    cfg = parse(["--spool-dir", "spool", "--pid-file", "@app/run.pid", "--server-auth", "/pam",
                 "--client-tls-verify", "<default>", "--filter", "@app/bin/f"])
    assert cfg.spool_dir == os.path.join(os.getcwd(), "spool")
    assert cfg.pid_file == os.path.join(ROOT, "run.pid")
    assert cfg.filter == [os.path.join(ROOT, "bin/f")]
    assert cfg.server_auth == "/pam" and cfg.client_tls_verify == "<default>"


def test_as_server_implies_log_and_close_stderr():
    cfg = parse(["--as-server"])
    assert cfg.log and cfg.close_stderr
    assert not cfg.no_daemon and not cfg.forward_on_disconnect and cfg.forward_to is None
    assert cfg.given("log") and cfg.given("close-stderr")


def test_as_client_implies_its_options():
    cfg = parse(["-q", "mx.example.com:587"])
    assert cfg.log and cfg.no_syslog and cfg.no_daemon and cfg.dont_serve and cfg.forward
    assert cfg.forward_to == "mx.example.com:587"
    assert not cfg.close_stderr


def test_as_proxy_implies_its_options():
    cfg = parse(["--as-proxy=mx.example.com:25"])
    assert cfg.log and cfg.close_stderr and cfg.forward_on_disconnect
    assert cfg.forward_to == "mx.example.com:25"
    assert not cfg.no_daemon and not cfg.dont_serve and not cfg.forward


def test_as_client_with_the_same_forward_to_is_fine():
    assert parse(["--as-client", "h:25", "--forward-to", "h:25"]).forward_to == "h:25"


def test_syslog_value_and_anonymous_value_need_equals():
    cfg = parse(["--syslog", "--anonymous", "--port", "26"])
    assert cfg.syslog is True and cfg.anonymous is True and cfg.port == 26
    cfg = parse(["--syslog=local3", "--anonymous=vrfy"])
    assert cfg.syslog == "local3" and cfg.anonymous == "vrfy"
    with pytest.raises(UsageError, match="too many arguments"):
        parse(["--syslog", "local0", "a.conf"])


def test_help_and_version_skip_the_checks():
    assert parse(["--help", "--forward"]).help
    assert parse(["-V", "--server-tls"]).version


BAD = [
    (["--no-such-option"], "unknown option: --no-such-option"),
    (["-P"], "unknown option: -P"),
    (["--port"], "--port: missing value"),
    (["-p"], "-p (--port): missing value"),
    (["--port", "smtp"], "--port: invalid port number smtp"),
    (["--port", "0"], "--port: invalid port number 0"),
    (["--port=65536"], "--port: invalid port number 65536"),
    (["--pop-port", "-1"], "--pop-port: invalid port number -1"),
    (["--admin", "x"], "--admin: invalid port number x"),
    (["--size", "10k"], "--size: invalid number 10k"),
    (["--max-recipients", "99"], "--max-recipients: 99 is too small (at least 100)"),
    (["--max-connections", "0"], "--max-connections: 0 is too small"),
    (["--idle-timeout", "soon"], "--idle-timeout: invalid time in seconds soon"),
    (["--poll", "-5", "--forward-to", "h:25"], "--poll: invalid time"),
    (["--log=yes"], "--log: takes no value"),
    (["--spool-dir="], "--spool-dir: empty value"),
    (["--port", "25", "--port", "26"], "--port: given more than once"),
    (["--forward"], "--forward needs --forward-to"),
    (["--forward-on-disconnect"], "--forward-on-disconnect needs --forward-to"),
    (["--poll", "60"], "--poll needs --forward-to"),
    (["--immediate"], "--immediate needs --forward-to"),
    (["--server-tls"], "--server-tls needs --server-tls-certificate"),
    (["--server-tls-connection"], "--server-tls-connection needs --server-tls-certificate"),
    (["--client-tls", "--client-tls-connection"], "cannot be used together"),
    (["--pop-by-name"], "--pop-by-name needs --pop"),
    (["--pop-no-delete"], "--pop-no-delete needs --pop"),
    (["--admin-terminate"], "--admin-terminate needs --admin"),
    (["--no-smtp", "--immediate", "--forward-to", "h:25"], "--immediate needs the SMTP server"),
    (["--as-server", "--as-client", "h:25"], "--as-server and --as-client cannot be used"),
    (["--as-client", "a:25", "--forward-to", "b:25"], "give different servers"),
    (["--forward-to", "h:notaport"], "--forward-to:"),
    (["--anonymous=vrfy,everything"], "--anonymous: unknown scope everything"),
    (["--syslog=mial"], "--syslog: unknown facility mial"),
    (["--tls-config", "tlsv1.2,sslv3"], "--tls-config: unknown keyword sslv3"),
    (["--tls-config", "mbedtls"], "--tls-config: mbedtls is not available"),
    (["--server-auth-config", "m:plain;q:login"], "--server-auth-config: bad item q:login"),
    (["--client-auth-config", "plain"], "--client-auth-config: bad item plain"),
    (["--server-tls-certificate=a", "--server-tls-certificate=b",
      "--server-tls-certificate=c"], "--server-tls-certificate: give it once"),
    (["a.conf", "b.conf"], "too many arguments: b.conf"),
    (["/no/such/file.conf"], "cannot read config file /no/such/file.conf"),
    (["--port", "2\n5"], "--port: invalid port number '2\\n5'"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, m in BAD])
def test_bad_options_give_one_line(argv, message):
    with pytest.raises(UsageError) as info:
        parse(argv)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("content,message", [
    ("port 25\nbogus 1\n", ":2: unknown option: bogus"),
    ("\n# c\nport\n", ":3: port: missing value"),
    ("--port 25\n", ":1: write the option name without dashes"),
    ("log yes\n", ":1: --log: takes no value"),
    ("port abc\n", ":1: --port: invalid port number abc"),
])
def test_config_file_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.conf"
    path.write_text(content)
    with pytest.raises(UsageError) as info:
        parse([str(path)])
    assert str(info.value).startswith(str(path) + ":")
    assert message in str(info.value)


@pytest.mark.parametrize("argv,message", [
    (["--remote-client"], "unknown option: --remote-client (did you mean --remote-clients?)"),
    (["--spool_dir", "x"], "unknown option: --spool_dir (did you mean --spool-dir?)"),
    (["--Port", "25"], "unknown option: --Port (did you mean --port?)"),
    (["--forwad-to=h:25"], "unknown option: --forwad-to (did you mean --forward-to?)"),
    (["--xyzzy"], "unknown option: --xyzzy"),
])
def test_a_mistyped_option_gets_a_suggestion(argv, message):
    with pytest.raises(UsageError) as info:
        parse(argv)
    assert str(info.value) == message


def test_a_mistyped_option_in_a_config_file_gets_a_suggestion(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("spool-dir /tmp\nremote-client\n")
    with pytest.raises(UsageError) as info:
        parse([str(path)])
    assert str(info.value) == "%s:2: unknown option: remote-client (did you mean remote-clients?)" \
        % path


def test_help_texts_do_not_contradict_themselves():
    text = usage.help_text(True)
    bad_commands = text[text.index("--max-bad-commands"):text.index("--min-data-rate")]
    assert "8th error" in bad_commands and "may send 10" in bad_commands
    assert "Default" not in bad_commands
    # The man page holds the --dnsbl text too: it cannot send the reader there.
    assert "man page" not in option_table.BY_NAME["dnsbl"].help
    assert "EMAILRELAY_DNSBL_CHECK_LOCAL is 1" in option_table.BY_NAME["dnsbl"].help


def test_config_file_name_equals_value_and_flags(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("port=2526\nremote-clients\nanonymous\nsyslog local1\n")
    cfg = parse([str(path)])
    assert cfg.port == 2526 and cfg.remote_clients and cfg.anonymous is True
    assert cfg.syslog == "local1"


def test_sample_config_file_parses():
    cfg = parse([os.path.join(ROOT, "etc", "emailrelay.conf")])
    assert cfg.as_server and cfg.log and cfg.close_stderr
    assert cfg.spool_dir == "/var/spool/emailrelay"
    assert cfg.forward_to and cfg.forward_on_disconnect


def test_options_without_effect_leave_notes():
    cfg = parse(["--hidden", "--localedir", "/usr/share/locale"])
    assert any("Windows only" in n for n in cfg.notes)
    assert any("--localedir" in n for n in cfg.notes)
    assert parse([]).notes == []


def test_short_help_shows_basic_options_only():
    text = usage.help_text(False)
    assert text.startswith("usage: emailrelay")
    for opt in option_table.OPTIONS:
        assert (("--" + opt.name + " ") in text or ("--" + opt.name + "\n") in text) \
            == (opt.group == "Basic"), opt.name
    assert "--help --verbose" in text


def _help_option_names(text):
    return set(re.findall(r"^  (?:-\S, )?--([a-z0-9-]+)", text, re.M))


def test_verbose_help_shows_every_option_by_group():
    text = usage.help_text(True)
    assert _help_option_names(text) == set(option_table.BY_NAME)
    positions = [text.index("%s options:" % g) for g in option_table.GROUPS]
    assert positions == sorted(positions)
    assert "  -p, --port <port>\n" in text
    assert "  -A, --anonymous, --anonymous=<scope>\n" in text
    assert "Default: 25." in text


def test_version_text():
    assert usage.version_text(False) == "emailrelay %s\n" % usage.__version__
    text = usage.version_text(True)
    assert re.search(r"^TLS library: (OpenSSL .*|none)$", text, re.M)
    assert re.search(r"^PAM: (en|dis)abled$", text, re.M)


def test_man_page_is_generated_from_the_table():
    with open(os.path.join(ROOT, "man", "emailrelay.8")) as f:
        assert f.read() == usage.man_page(), "run 'make man' to regenerate man/emailrelay.8"


def test_man_page_documents_every_option_and_the_rest():
    page = usage.man_page()
    documented = set(re.findall(r"^\.B (?:\\-\S, )?\\-\\-([a-z0-9\\-]+)", page, re.M))
    assert {n.replace("\\-", "-") for n in documented} == set(option_table.BY_NAME)
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "CONFIG FILE", "SIGNALS",
                    "EXIT STATUS", "FILES", "SEE ALSO"):
        assert "\n.SH %s\n" % section in page
    for group in option_table.GROUPS:
        assert "\n.SS %s options\n" % group in page


def test_man_page_renders_without_warnings():
    man = subprocess.run(["man", "--warnings", "-l", os.path.join(ROOT, "man", "emailrelay.8")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                         env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0"))
    assert man.returncode == 0, man.stderr
    assert man.stderr == ""
    text = re.sub(".\b", "", man.stdout)  # drop overstrike bold
    assert "--max-bounce-recipients <n>" in text


def test_help_from_the_command_line():
    run = subprocess.run([sys.executable, "-m", "emailrelay", "--help", "--verbose"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert run.returncode == 0
    assert run.stdout == usage.help_text(True)
