"""pytest configuration: makes tests/helpers.py importable as `helpers`, and
fixtures shared by several files."""

import os
import pwd
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Fixtures shared by several test files: pytest finds them here.
from certs import certs  # noqa: E402,F401


@pytest.fixture
def daemon_spool():
    """A spool directory the `daemon` user can write, outside root's private tmp."""
    d = tempfile.mkdtemp(prefix="emailrelay-daemon-")
    os.chmod(d, 0o755)
    spool = os.path.join(d, "spool")
    os.mkdir(spool)
    daemon = pwd.getpwnam("daemon")
    os.chown(spool, daemon.pw_uid, daemon.pw_gid)
    yield spool
    shutil.rmtree(d)
