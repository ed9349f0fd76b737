"""bin/emailrelay-passwd: E-MailRelay's vector through the launcher."""

import os
import subprocess
import sys

from helpers import BIN

TOOL = os.path.join(BIN, "emailrelay-passwd")


def run(args, stdin=""):
    return subprocess.run([sys.executable, TOOL] + args, input=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=30, cwd="/")


def test_vector_from_stdin():
    r = run([], "foobar\n")
    assert r.returncode == 0
    assert r.stdout == "3pIN0aPbd5aN0S4ogKA3w2P3P9XH0hXchLP1W+adpQE=\n"


def test_launcher_is_executable_directly():
    r = subprocess.run([TOOL], input="foobar\n", stdout=subprocess.PIPE, universal_newlines=True,
                       timeout=30, cwd="/")
    assert r.stdout == "3pIN0aPbd5aN0S4ogKA3w2P3P9XH0hXchLP1W+adpQE=\n"


def test_options():
    assert run(["-p", "foobar"]).stdout.strip() == "3pIN0aPbd5aN0S4ogKA3w2P3P9XH0hXchLP1W+adpQE="
    assert run(["--base64"], "Zm9vYmFy\n").stdout.strip() == "3pIN0aPbd5aN0S4ogKA3w2P3P9XH0hXchLP1W+adpQE="
    assert run(["-H", "none", "-p", "my password+="]).stdout.strip() == "my+20password+2B+3D"
    dotted = run(["--dotted"], "foobar\n").stdout.strip()
    assert dotted.split(".")[0] == str(0xd10d92de)


def test_errors():
    r = run([], "\n")
    assert r.returncode != 0 and "invalid password" in r.stderr
    r = run(["extra"])
    assert r.returncode == 2 and "usage" in r.stderr
    r = run(["-H", "sha512"], "x\n")
    assert r.returncode != 0 and "not available" in r.stderr
