"""Packaging: the stdlib-only rule, cheap start-up, the three ways to run the
program, Python 3.8 compatibility, and `make install`."""

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import importlib.util

import pytest

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
    assert "emailrelay.config.options" in names
    return names


@pytest.mark.parametrize("args", [["--help"], ["--help", "--verbose"], ["--version"]])
def test_start_up_imports_nothing_heavy(args):
    names = imports_at(args)
    heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert heavy == []
    assert not any(n.startswith("emailrelay.") and n not in (
        "emailrelay.main", "emailrelay.__main__", "emailrelay.config", "emailrelay.config.options",
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


def make_install(tmp_path, *variables):
    dest = tmp_path / "dest"
    result = run(["make", "-s", "install", "DESTDIR=%s" % dest, "PYTHON=%s" % sys.executable,
                  "SPOOLDIR=/var/spool/emailrelay"] + list(variables))
    assert result.returncode == 0, result.stderr
    return dest


def test_make_install(tmp_path):
    dest = make_install(tmp_path, "PREFIX=/usr", "PYTHONSITE=/usr/lib/python3/dist-packages")
    assert (dest / "usr/lib/emailrelay/emailrelay/main.py").is_file()
    assert not list((dest / "usr/lib/emailrelay").rglob("__pycache__"))
    assert (dest / "usr/share/man/man1/emailrelay.1").is_file()
    assert (dest / "usr/share/man/man1/emailrelay-sendmail.1").is_file()
    assert (dest / "etc/emailrelay.conf.example").is_file()
    assert (dest / "usr/lib/systemd/system/emailrelay.service").is_file()
    assert (dest / "usr/lib/systemd/system/emailrelay.socket").is_file()
    with open(str(dest / "usr/lib/systemd/system/emailrelay@.service")) as f:
        template = f.read()
    assert "ExecStart=/usr/sbin/emailrelay --inetd --remote-clients --log " \
        "--spool-dir /var/spool/emailrelay\n" in template
    for tool in ("submit", "passwd", "resubmit", "filter-copy", "sendmail"):
        assert os.access(str(dest / "usr/sbin" / ("emailrelay-" + tool)), os.X_OK)
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


def test_make_install_honours_prefix_and_sysconfdir(tmp_path):
    dest = make_install(tmp_path, "PREFIX=/opt/x", "PYTHONSITE=")
    assert (dest / "opt/x/etc/emailrelay.conf.example").is_file()
    assert not (dest / "etc").exists(), "nothing outside PREFIX but the spool"
    assert (dest / "opt/x/etc/logrotate.d/emailrelay").is_file()
    assert os.access(str(dest / "opt/x/etc/ppp/ip-up.d/emailrelay"), os.X_OK)
    dest2 = make_install(tmp_path / "two", "PREFIX=/opt/x", "SYSCONFDIR=/etc/x", "PYTHONSITE=")
    assert (dest2 / "etc/x/emailrelay.conf").is_file()
    with open(str(dest2 / "opt/x/lib/systemd/system/emailrelay.service")) as f:
        unit = f.read()
    assert "ExecStart=/opt/x/sbin/emailrelay --no-daemon --log /etc/x/emailrelay.conf\n" in unit
    assert "ReadWritePaths=/var/spool/emailrelay " in unit
    assert "@" not in unit.replace("@system-service", "")


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
                  "SPOOLDIR=%s" % (tmp_path / "spool"), "SENDMAIL=yes",
                  "SENDMAILDIR=%s" % (usr / "sbin"), "MAILQDIR=%s" % (usr / "bin"),
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


def test_systemd_analyze_security_rates_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: run tests/install-deps.sh"
    dest = make_install(tmp_path, "PREFIX=/usr", "PYTHONSITE=")
    unit = str(dest / "usr/lib/systemd/system/emailrelay.service")
    result = run([analyze, "security", "--offline=yes", "--no-pager", unit])
    text = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for emailrelay.service: ([0-9.]+) (\w+)", text)
    assert match, text
    assert float(match.group(1)) <= 3.0, text


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
