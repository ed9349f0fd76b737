"""Packaging: the stdlib-only rule, cheap start-up, the three ways to run the
program, Python 3.8 compatibility, and `make install`."""

import ast
import os
import re
import shutil
import smtplib
import subprocess
import sys
import sysconfig
import importlib.util

import pytest

import syslogd
from helpers import free_port, spool_files, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("ssl", "smtplib", "email", "subprocess", "ctypes", "socketserver", "poplib")


def run(args, **kwargs):
    kwargs.setdefault("cwd", ROOT)
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120, **kwargs)


def clean_env():
    """The environment without PYTHONPATH, so only the code under test is found."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def product_files():
    """Every Python file of the product: the package, the launcher and bin/."""
    files = [os.path.join(ROOT, "emailrelay.py")]
    for directory, _, names in os.walk(os.path.join(ROOT, "emailrelay")):
        files += [os.path.join(directory, n) for n in names if n.endswith(".py")]
    bin_dir = os.path.join(ROOT, "bin")
    for name in sorted(os.listdir(bin_dir)):
        path = os.path.join(bin_dir, name)
        with open(path, "rb") as f:
            if name.endswith(".py") or b"python" in f.readline():
                files.append(path)
    return files


def imported_modules(path):
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def is_stdlib(name):
    if name in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    paths = sysconfig.get_paths()
    origin = os.path.realpath(spec.origin)
    return "site-packages" not in origin and "dist-packages" not in origin and any(
        origin.startswith(os.path.realpath(paths[k]) + os.sep) for k in ("stdlib", "platstdlib"))


def test_product_imports_only_the_standard_library():
    assert len(product_files()) > 10
    bad = []
    for path in product_files():
        for name in imported_modules(path):
            if name != "emailrelay" and not is_stdlib(name):
                bad.append("%s: %s" % (os.path.relpath(path, ROOT), name))
    assert bad == []


def test_the_stdlib_check_can_fail():
    assert is_stdlib("json") and is_stdlib("sys") and is_stdlib("ssl")
    assert not is_stdlib("pytest")


def imports_at(args):
    """Names of the modules imported by `python3 -X importtime -m emailrelay ARGS`."""
    result = run([sys.executable, "-X", "importtime", "-m", "emailrelay"] + args, env=clean_env())
    assert result.returncode == 0, result.stderr
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "emailrelay.config.options" in names and "emailrelay.config.option_table" in names
    return names


@pytest.mark.parametrize("args", [["--help"], ["--help", "--verbose"], ["--version"]])
def test_start_up_imports_nothing_heavy(args):
    names = imports_at(args)
    heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert heavy == []
    assert not any(n.startswith("emailrelay.") and n not in (
        "emailrelay.main", "emailrelay.__main__", "emailrelay.config", "emailrelay.config.options",
        "emailrelay.config.option_table",
        "emailrelay.config.usage", "emailrelay.util", "emailrelay.util.parts",
        "emailrelay.util.addresses", "emailrelay.util.smtp_controls")
        for n in names), names


def test_python_m_emailrelay_help():
    result = run([sys.executable, "-m", "emailrelay", "--help"], env=clean_env())
    assert result.returncode == 0
    assert result.stdout.startswith("usage: emailrelay")


def test_launcher_from_a_copied_tree(tmp_path):
    tree = tmp_path / "copy"
    shutil.copytree(os.path.join(ROOT, "emailrelay"), str(tree / "emailrelay"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(os.path.join(ROOT, "emailrelay.py"), str(tree / "emailrelay.py"))
    result = run([str(tree / "emailrelay.py"), "--help", "--verbose"], cwd=str(tmp_path),
                 env=clean_env())
    assert result.returncode == 0, result.stderr
    assert "Logging options:" in result.stdout
    assert os.access(os.path.join(ROOT, "emailrelay.py"), os.X_OK)


def test_usage_error_exit_status_and_one_message():
    result = run([sys.executable, "-m", "emailrelay", "--port", "none"], env=clean_env())
    assert result.returncode == 2
    assert result.stdout == ""
    assert "--port: invalid port number none" in result.stderr.splitlines()[0]


def test_zipapp(tmp_path):
    target = tmp_path / "emailrelay.pyz"
    result = run(["make", "-s", "zipapp", "ZIPAPP=%s" % target, "PYTHON=%s" % sys.executable])
    assert result.returncode == 0, result.stderr
    with open(str(target), "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"
    assert not os.path.exists(str(target) + ".build")
    result = run([str(target), "--version"], cwd=str(tmp_path), env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("emailrelay ")
    result = run([sys.executable, str(target), "--help"], cwd=str(tmp_path), env=clean_env())
    assert result.returncode == 0 and "--as-server" in result.stdout
    result = run([str(target), "--port", "x"], cwd=str(tmp_path), env=clean_env())
    assert result.returncode == 2 and "--port" in result.stderr


def test_vermin_says_python_3_8_is_enough():
    vermin = shutil.which("vermin")
    assert vermin, "vermin is missing: run tests/install-deps.sh"
    result = run([vermin, "-t=3.8-", "--no-tips", "--violations", "emailrelay", "emailrelay.py",
                  "bin"])
    assert result.returncode == 0, result.stdout + result.stderr


def make_install(tmp_path, *variables, python=sys.executable):
    """`make install DESTDIR=tmp_path/dest VARIABLES`; returns the staging root.

    `python` is given as PYTHON (None: not given, as a user would run it).
    """
    dest = tmp_path / "dest"
    args = ["make", "-s", "install", "DESTDIR=%s" % dest, "SPOOLDIR=/var/spool/emailrelay"]
    if python:
        args.append("PYTHON=%s" % python)
    make_env = clean_env()
    make_env.pop("PYTHON", None)
    result = run(args + list(variables), env=make_env)
    assert result.returncode == 0, result.stderr
    return dest


def staged(dest):
    """Every file and directory under the staging root, relative to it."""
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))


def test_make_install(tmp_path):
    dest = make_install(tmp_path, "PREFIX=/usr", "PYTHONSITE=/usr/lib/python3/dist-packages")
    assert (dest / "usr/lib/emailrelay/emailrelay/main.py").is_file()
    assert not list((dest / "usr/lib/emailrelay").rglob("__pycache__"))
    assert (dest / "usr/lib/python3/dist-packages/emailrelay.pth").read_text() == \
        "/usr/lib/emailrelay\n", "PYTHONSITE given: the packager asked for it"
    assert (dest / "usr/share/man/man8/emailrelay.8").is_file()
    assert (dest / "usr/share/man/man8/emailrelay-sendmail.8").is_file()
    assert (dest / "etc/emailrelay.conf.example").is_file()
    assert (dest / "usr/lib/systemd/system/emailrelay.service").is_file()
    assert (dest / "usr/lib/systemd/system/emailrelay.socket").is_file()
    for tool in ("submit", "passwd", "resubmit", "filter-copy", "sendmail"):
        launcher = dest / "usr/sbin" / ("emailrelay-" + tool)
        assert os.access(str(launcher), os.X_OK)
        with open(str(launcher)) as f:
            assert f.readline() == "#!%s\n" % sys.executable, "PYTHON given: the launchers use it"
    assert not (dest / "usr/sbin/sendmail").exists(), "sendmail only when asked"
    assert not (dest / "usr/bin/mailq").exists(), "mailq only when asked"
    # The launcher names /usr/lib/emailrelay; point Python at the staged copy.
    env = clean_env()
    env["PYTHONPATH"] = str(dest / "usr/lib/emailrelay")
    launcher = str(dest / "usr/sbin/emailrelay")
    result = run([sys.executable, launcher, "--version"], cwd=str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("emailrelay ")
    result = run([launcher, "--help"], cwd=str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr


def test_default_install_uses_system_python_and_the_daemons_directories(tmp_path):
    """`make install DESTDIR=...` as a packager runs it: PREFIX=/usr/local, no PYTHON."""
    dest = make_install(tmp_path, python=None)
    for launcher in (dest / "usr/local/sbin").iterdir():
        with open(str(launcher)) as f:
            assert f.readline() == "#!/usr/bin/python3\n", launcher
    assert not [p for p in staged(dest) if p.endswith(".pth")], \
        "no path of the build host's Python in a staged install"
    # pppd and logrotate read /etc, whatever the PREFIX.
    assert os.access(str(dest / "etc/ppp/ip-up.d/emailrelay"), os.X_OK)
    with open(str(dest / "etc/logrotate.d/emailrelay")) as f:
        assert "\n/var/log/emailrelay/*.log {\n" in f.read()
    assert (dest / "usr/local/etc/emailrelay.conf").is_file()
    assert not (dest / "usr/local/etc/ppp").exists() and not (dest / "usr/local/etc/logrotate.d").exists()
    logs = dest / "var/log/emailrelay"
    assert logs.is_dir() and os.stat(str(logs)).st_mode & 0o7777 == 0o750
    for unit in ("emailrelay.service", "emailrelay@.service"):
        with open(str(dest / "usr/local/lib/systemd/system" / unit)) as f:
            assert "\nLogsDirectory=emailrelay\n" in f.read()


def test_install_with_a_missing_python_stops_before_writing(tmp_path):
    dest = tmp_path / "dest"
    result = run(["make", "-s", "install", "DESTDIR=%s" % dest, "PYTHON=no-such-python3"])
    assert result.returncode != 0
    assert "make install: PYTHON=no-such-python3: no such interpreter" in result.stderr
    assert not dest.exists()


def test_programs_in_sbin_have_section_8_man_pages(tmp_path):
    dest = make_install(tmp_path, "PREFIX=/usr", "PYTHONSITE=")
    programs = sorted(p.name for p in (dest / "usr/sbin").iterdir())
    assert len(programs) == 6
    pages = sorted(p.name for p in (dest / "usr/share/man").rglob("*") if p.is_file())
    assert pages == sorted(name + ".8" for name in programs)
    for name in programs:
        with open(str(dest / "usr/share/man/man8" / (name + ".8"))) as f:
            text = f.read()
        assert text.startswith(".TH %s 8 " % name.upper()), name
        assert not re.search(r"^\.BR emailrelay\S* \(1\)", text, re.M), name


def test_make_install_honours_prefix_and_sysconfdir(tmp_path):
    dest = make_install(tmp_path, "PREFIX=/opt/x", "PYTHONSITE=")
    assert (dest / "opt/x/etc/emailrelay.conf.example").is_file()
    outside = [p for p in staged(dest) if not p.startswith("opt")]
    assert outside == ["etc", "etc/logrotate.d", "etc/logrotate.d/emailrelay", "etc/ppp",
                       "etc/ppp/ip-up.d", "etc/ppp/ip-up.d/emailrelay", "var", "var/log",
                       "var/log/emailrelay", "var/spool", "var/spool/emailrelay"], \
        "outside PREFIX: only what other daemons read, the logs and the spool"
    dest2 = make_install(tmp_path / "two", "PREFIX=/opt/x", "SYSCONFDIR=/etc/x", "PYTHONSITE=")
    assert (dest2 / "etc/x/emailrelay.conf").is_file()
    with open(str(dest2 / "opt/x/lib/systemd/system/emailrelay.service")) as f:
        unit = f.read()
    assert "ExecStart=/opt/x/sbin/emailrelay --no-daemon --log /etc/x/emailrelay.conf\n" in unit
    assert "ReadWritePaths=/var/spool/emailrelay\n" in unit
    for name in ("emailrelay.service", "emailrelay@.service"):
        with open(str(dest2 / "opt/x/lib/systemd/system" / name)) as f:
            assert not re.search(r"@[A-Z]+@", f.read()), "every placeholder substituted"
    with open(str(dest2 / "etc/ppp/ip-up.d/emailrelay")) as f:
        assert "/opt/x/sbin/emailrelay --as-client" in f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the spool to the run user needs root")
def test_make_install_creates_spool_and_minimal_config_once(tmp_path):
    import pwd
    dest = make_install(tmp_path, "PREFIX=/usr", "PYTHONSITE=")
    spool = dest / "var/spool/emailrelay"
    st = os.stat(str(spool))
    assert st.st_uid == pwd.getpwnam("daemon").pw_uid and st.st_mode & 0o7777 == 0o770
    conf = dest / "etc/emailrelay.conf"
    with open(str(conf)) as f:
        text = f.read()
    assert "spool-dir /var/spool/emailrelay\n" in text and "user daemon\n" in text
    # The installed config is a configuration the program accepts.
    check = run([sys.executable, "-m", "emailrelay", str(conf), "--help"], env=clean_env())
    assert check.returncode == 0, check.stderr
    conf.write_text("# mine\n")
    make_install(tmp_path, "PREFIX=/usr", "PYTHONSITE=")
    assert conf.read_text() == "# mine\n", "an existing config is never overwritten"


def test_python_m_emailrelay_after_install_and_sendmail_when_asked(tmp_path):
    """A real install (no DESTDIR) under a scratch PREFIX, site directory and spool."""
    prefix, site_dir = tmp_path / "prefix", tmp_path / "site"
    usr = tmp_path / "usr"
    result = run(["make", "-s", "install", "PREFIX=%s" % prefix, "PYTHONSITE=%s" % site_dir,
                  "SPOOLDIR=%s" % (tmp_path / "spool"), "LOGDIR=%s" % (tmp_path / "log"),
                  "PPPDIR=%s" % (tmp_path / "ppp"), "LOGROTATEDIR=%s" % (tmp_path / "logrotate.d"),
                  "SENDMAIL=yes", "SENDMAILDIR=%s" % (usr / "sbin"), "MAILQDIR=%s" % (usr / "bin"),
                  "PYTHON=%s" % sys.executable])
    assert result.returncode == 0, result.stderr
    assert (site_dir / "emailrelay.pth").read_text() == "%s/lib/emailrelay\n" % prefix
    for link in ("sbin/sendmail", "bin/mailq"):
        assert os.readlink(str(usr / link)) == "%s/sbin/emailrelay-sendmail" % prefix
    # site.addsitedir() is what the interpreter does with its own site
    # directory at start-up: then "python3 -m emailrelay" finds the package.
    code = ("import runpy, site, sys; site.addsitedir(%r); sys.argv = ['emailrelay', '--version']; "
            "runpy.run_module('emailrelay', run_name='__main__', alter_sys=True)" % str(site_dir))
    result = run([sys.executable, "-c", code], cwd=str(tmp_path), env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("emailrelay ")
    # mailq (by its name) lists the queue of the relay its configuration names.
    conf = tmp_path / "emailrelay.conf"
    conf.write_text("spool-dir %s\n" % (tmp_path / "spool"))
    env = clean_env()
    env["EMAILRELAY_CONF"] = str(conf)
    result = run([str(usr / "bin/mailq")], cwd=str(tmp_path), env=env)
    assert (result.returncode, result.stdout) == (0, "Mail queue is empty\n"), result.stderr


def exposure(analyze, unit):
    """`systemd-analyze security --offline=true`'s overall exposure of a unit file."""
    result = run([analyze, "security", "--offline=true", "--no-pager", unit])
    text = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", text)
    assert match, text
    return float(match.group(1)), text


def test_systemd_analyze_security_rates_both_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: run tests/install-deps.sh"
    dest = make_install(tmp_path, "PREFIX=/usr", "PYTHONSITE=")
    units = dest / "usr/lib/systemd/system"
    daemon, daemon_text = exposure(analyze, str(units / "emailrelay.service"))
    assert daemon <= 3.0, daemon_text
    session, session_text = exposure(analyze, str(units / "emailrelay@.service"))
    assert session <= daemon, session_text


@pytest.mark.skipif(not syslogd.usable(), reason="needs root and mount namespaces")
def test_systemd_analyze_verify_passes_the_installed_units(tmp_path):
    """The units as installed: their programs and man pages must exist, so the staged
    /usr/sbin and man8 are shown on top of the host's in a private namespace."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: run tests/install-deps.sh"
    dest = make_install(tmp_path, "PREFIX=/usr", "PYTHONSITE=")
    units = dest / "usr/lib/systemd/system"
    files = [str(units / name) for name in ("emailrelay.service", "emailrelay.socket",
                                            "emailrelay@.service")]
    with syslogd.SyslogReceiver(tmp_path / "ns") as ns:
        result = run(ns.command([analyze, "verify"] + files, dest,
                                ["/usr/sbin", "/usr/share/man/man8"]))
    assert result.returncode == 0 and result.stderr == "", result.stderr


def unit_directives(path):
    """The `Key=value` lines of a unit file's [Service] section, as a dict."""
    directives, section = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                directives[key] = value
    return directives


@pytest.mark.skipif(not syslogd.usable(), reason="needs root and mount namespaces")
@pytest.mark.parametrize("stranger", [False, True])
def test_the_installed_session_unit_serves_local_clients_only(tmp_path, daemon_spool, stranger):
    """emailrelay@.service's command line as installed, run per connection as systemd's
    Accept=yes does (systemd-socket-activate --inetd): a local client's message is
    stored; a client from elsewhere is refused."""
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is missing: run tests/install-deps.sh"
    dest = make_install(tmp_path, "PREFIX=/usr", "PYTHONSITE=", "SPOOLDIR=%s" % daemon_spool)
    argv = unit_directives(str(dest / "usr/lib/systemd/system/emailrelay@.service"))["ExecStart"]
    argv = argv.split()
    if stranger:
        argv += ["--test-address", "[192.0.2.1]"]
    port = free_port()
    errors = tmp_path / "activate.log"
    with open(str(errors), "wb") as stderr, syslogd.SyslogReceiver(tmp_path / "ns") as ns:
        proc = subprocess.Popen(ns.command([activate, "--listen=127.0.0.1:%d" % port, "--inetd",
                                            "--accept"] + argv, dest, ["/usr/sbin", "/usr/lib"]),
                                env=clean_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for(lambda: "Listening on" in errors.read_text(), what="the socket")
            if stranger:
                with pytest.raises(smtplib.SMTPConnectError) as refused:
                    smtplib.SMTP("127.0.0.1", port, timeout=30)
                assert refused.value.smtp_code == 554
            else:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.sendmail("a@x.test", ["b@y.test"], b"Subject: hi\r\n\r\nhello\r\n")
                assert len(spool_files(daemon_spool, ".envelope")) == 1
        finally:
            proc.terminate()
            proc.wait(30)


def test_the_socket_activated_pair_is_no_open_relay():
    with open(os.path.join(ROOT, "etc", "emailrelay.socket")) as f:
        listen = re.findall(r"^ListenStream=(.*)$", f.read(), re.M)
    assert listen == ["127.0.0.1:25"]
    session = unit_directives(os.path.join(ROOT, "etc", "emailrelay@.service.in"))
    assert "--remote-clients" not in session["ExecStart"]
    daemon = unit_directives(os.path.join(ROOT, "etc", "emailrelay.service.in"))
    hardening = {k: v for k, v in daemon.items()
                 if k not in ("Type", "NotifyAccess", "ExecStart", "ExecReload", "Restart",
                              "RuntimeDirectory")}
    assert hardening["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID"
    # The session binds no port; everything else is the daemon's.
    hardening["CapabilityBoundingSet"] = "CAP_SETUID CAP_SETGID"
    assert {k: session.get(k) for k in hardening} == hardening


def test_systemd_unit_and_ci_script():
    with open(os.path.join(ROOT, "etc", "emailrelay.service.in")) as f:
        unit = f.read()
    assert "Type=notify" in unit and "--no-daemon" in unit
    for hardening in ("ProtectSystem=strict", "ReadWritePaths=@SPOOLDIR@", "PrivateTmp=yes",
                      "NoNewPrivileges=yes", "ProtectHome=yes",
                      "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID"):
        assert hardening in unit
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "make test" in f.read()
    assert os.access(os.path.join(ROOT, ".ci", "run"), os.X_OK)
