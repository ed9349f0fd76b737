"""pam: real Linux PAM with a service file and a system user made by the test.

CI runs as root; the test writes /etc/pam.d/<unique name> (pam_unix for auth)
and creates a user with a known password, and removes both afterwards.
"""

import os
import subprocess
import uuid

import pytest

from emailrelay import pam, sasl, secrets

PASSWORD = "S3cret pw+=#"


@pytest.fixture
def pam_service():
    if os.geteuid() != 0:
        pytest.fail("the PAM test needs root (CI runs as root)")
    tag = uuid.uuid4().hex[:8]
    user, service = "ertest" + tag, "emailrelay-test-" + tag
    path = "/etc/pam.d/" + service
    with open(path, "w") as f:
        f.write("auth required pam_unix.so nodelay\naccount required pam_permit.so\n")
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True)
    try:
        subprocess.run(["chpasswd"], input="%s:%s\n" % (user, PASSWORD), universal_newlines=True,
                       check=True)
        yield user, service
    finally:
        subprocess.run(["userdel", user], check=False)
        os.unlink(path)


def test_available():
    assert pam.available()


def test_authenticate(pam_service):
    user, service = pam_service
    assert pam.authenticate(user, PASSWORD, service=service)
    assert not pam.authenticate(user, PASSWORD + "x", service=service)
    assert not pam.authenticate(user, "", service=service)
    assert not pam.authenticate("nosuchuser" + user, PASSWORD, service=service)


def test_unknown_service_denies(pam_service):
    user, _ = pam_service
    # With no service file PAM falls back to "other", which denies on Debian.
    assert not pam.authenticate(user, "wrong", service="emailrelay-no-such-service")


def test_sasl_plain_through_pam(pam_service, monkeypatch):
    user, service = pam_service
    monkeypatch.setattr(pam, "SERVICE", service)
    auth = sasl.ServerAuth(secrets.PAM_PATH)
    import base64
    ex = auth.start("PLAIN", base64.b64encode(b"\0" + user.encode() + b"\0" + PASSWORD.encode()), tls=True)
    assert ex.step(None) == ("ok", user)
    ex = auth.start("PLAIN", base64.b64encode(b"\0" + user.encode() + b"\0nope"), tls=True)
    assert ex.step(None) == ("fail", sasl.FAILED)
