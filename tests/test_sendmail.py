"""emailrelay-sendmail: the sendmail options cron, mailx and scripts use."""

import os
import subprocess

from helpers import BIN, PYTHON, ROOT, Relay, env, spool_files

SENDMAIL = os.path.join(BIN, "emailrelay-sendmail")


def sendmail(args, text, spool, **kwargs):
    e = env()
    e["EMAILRELAY_SPOOL"] = str(spool)
    # No installed configuration of this host may change what the tests see.
    e["EMAILRELAY_CONF"] = os.devnull
    return subprocess.run([SENDMAIL] + list(args), input=text.encode(), env=e,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30, **kwargs)


def envelope_and_content(spool):
    names = spool_files(str(spool), ".envelope")
    assert len(names) == 1, os.listdir(str(spool))
    stem = names[0][:-len(".envelope")]
    with open(os.path.join(str(spool), names[0]), "rb") as f:
        env_text = f.read().decode()
    with open(os.path.join(str(spool), stem + ".content"), "rb") as f:
        return env_text, f.read().decode()


def recipients(env_text):
    return [line.split(": ", 1)[1] for line in env_text.split("\r\n")
            if line.startswith("X-MailRelay-To-Remote:")]


def test_sendmail_t_oi_from_a_script_reaches_the_next_hop_without_bcc(tmp_path):
    """A cron-style script calls "sendmail -t -oi"; the relay forwards what it stored."""
    spool = tmp_path / "spool"
    spool.mkdir()
    path_dir = tmp_path / "path"
    path_dir.mkdir()
    os.symlink(SENDMAIL, str(path_dir / "sendmail"))
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/sh\n"
        "sendmail -t -oi <<'EOF'\n"
        "From: Cron Daemon <cron@host.test>\n"
        "To: admin@y.test, \"Ops\" <ops@y.test>\n"
        "Cc: audit@y.test\n"
        "Bcc: hidden@y.test,\n"
        "  hidden2@y.test\n"
        "Subject: nightly job\n"
        "\n"
        "line one\n"
        ".\n"
        "after the dot\n"
        "EOF\n")
    os.chmod(str(script), 0o755)
    e = env()
    e["PATH"] = str(path_dir) + os.pathsep + e["PATH"]
    e["EMAILRELAY_SPOOL"] = str(spool)
    e["EMAILRELAY_CONF"] = os.devnull
    result = subprocess.run([str(script)], env=e, stderr=subprocess.PIPE, timeout=30)
    assert result.returncode == 0, result.stderr
    env_text, content = envelope_and_content(spool)
    assert recipients(env_text) == ["admin@y.test", "ops@y.test", "audit@y.test",
                                    "hidden@y.test", "hidden2@y.test"]
    assert "X-MailRelay-From: cron@host.test\r\n" in env_text
    assert "Bcc" not in content and "hidden" not in content
    assert "\r\n.\r\nafter the dot\r\n" in content
    assert "\r\nDate: " in content and "\r\nMessage-ID: " in content

    with Relay(tmp_path, name="b") as b:
        forwarded = subprocess.run([PYTHON, "-m", "emailrelay", "--as-client", "127.0.0.1:%d" % b.port,
                                    "--spool-dir", str(spool), "--no-syslog", "--user", "root"],
                                   cwd=ROOT, env=env(), stderr=subprocess.PIPE, timeout=60)
        assert forwarded.returncode == 0, forwarded.stderr
        env_b, content_b = envelope_and_content(b.spool)
    assert recipients(env_b) == recipients(env_text)
    assert "hidden" not in content_b and "after the dot" in content_b


def test_a_lone_dot_ends_input_without_i_and_f_F_set_the_sender(tmp_path):
    result = sendmail(["-odi", "-f", "me@x.test", "-F", "Jo Bloggs", "--", "rcpt@y.test"],
                      "Subject: s\n\nkept\n.\ndropped\n", tmp_path)
    assert result.returncode == 0, result.stderr
    env_text, content = envelope_and_content(tmp_path)
    assert "X-MailRelay-From: me@x.test\r\n" in env_text
    assert recipients(env_text) == ["rcpt@y.test"]
    assert content.startswith("Subject: s\r\nFrom: \"Jo Bloggs\" <me@x.test>\r\n")
    assert "kept" in content and "dropped" not in content


def test_usage_errors_store_nothing(tmp_path):
    for args in (["-bd"], ["-q30m"], [], ["-t", "-X", "a@y.test"], ["-f"]):
        result = sendmail(args, "Subject: s\n\nx\n", tmp_path)
        assert result.returncode == 64, args
        assert result.stderr.decode().startswith("emailrelay-sendmail: usage error: "), args
    result = sendmail(["-t"], "Subject: no recipients\n\nx\n", tmp_path)
    assert result.returncode == 65
    assert "no recipients" in result.stderr.decode()
    assert os.listdir(str(tmp_path)) == []
    result = sendmail(["a@y.test"], "x\n", tmp_path / "missing")
    assert result.returncode == 73 and b"spool directory does not exist" in result.stderr
