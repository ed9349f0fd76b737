"""pam: real Linux PAM with a service file and a system user made by the test.

CI runs as root; the test writes /etc/pam.d/<unique name> (pam_unix for auth)
and creates a user with a known password, and removes both afterwards.
"""

import os
import subprocess
import uuid

import pytest

from emailrelay.auth import pam, sasl, secrets

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


@pytest.fixture
def pam_service_with_delay(pam_service):
    """The same user with a service whose pam_unix asks for its failure delay."""
    user, _ = pam_service
    service = "emailrelay-test-delay-" + uuid.uuid4().hex[:8]
    path = "/etc/pam.d/" + service
    with open(path, "w") as f:
        f.write("auth required pam_unix.so\naccount required pam_permit.so\n")
    try:
        yield user, service
    finally:
        os.unlink(path)


def test_a_failure_delay_stalls_only_its_own_login(pam_service_with_delay):
    import threading
    import time
    user, service = pam_service_with_delay
    times = {}

    def login(name, password):
        start = time.monotonic()
        ok = pam.authenticate(user, password, service=service)
        times[name] = (ok, time.monotonic() - start, time.monotonic())

    start = time.monotonic()
    threads = [threading.Thread(target=login, args=("bad%d" % i, "wrong")) for i in range(3)]
    threads.append(threading.Thread(target=login, args=("good", PASSWORD)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wall = time.monotonic() - start
    print(times, wall)
    for i in range(3):
        ok, elapsed, _ = times["bad%d" % i]
        assert not ok and elapsed >= 1.0  # pam_unix's delay (2 s +-25%) still applies
    # The good login does not wait behind a failure's delay.
    assert times["good"][0] and times["good"][1] < min(times["bad%d" % i][1] for i in range(3))
    # Serialised, the three delays would end at least 1.5 s apart each (3 s
    # from first to last); side by side they end within their jitter (1 s).
    ends = sorted(times["bad%d" % i][2] for i in range(3))
    assert ends[-1] - ends[0] < 2.5, (times, wall)


def test_conversation_frees_everything_on_an_unknown_prompt_style():
    import ctypes
    lib = pam._load()
    allocated, freed = [], []

    class RecordingLibc:
        def calloc(self, n, size):
            p = lib.libc.calloc(n, size)
            allocated.append(p)
            return p

        def strdup(self, s):
            p = lib.libc.strdup(s)
            allocated.append(p)
            return p

        def free(self, p):
            freed.append(p)
            lib.libc.free(p)

    fake = type("Lib", (), {})()
    fake.__dict__.update(lib.__dict__)
    fake.libc = RecordingLibc()

    class PamMessage(ctypes.Structure):
        _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]

    styles = [pam._PAM_PROMPT_ECHO_ON, pam._PAM_PROMPT_ECHO_OFF, 99]
    msgs = [PamMessage(s, b"prompt") for s in styles]
    pointers = (ctypes.POINTER(PamMessage) * 3)(*[ctypes.pointer(m) for m in msgs])
    responses = (ctypes.c_void_p * 1)()
    converse = pam.conversation(fake, b"user", b"password")
    rc = converse(3, pointers, ctypes.cast(responses, ctypes.POINTER(ctypes.c_void_p)), None)
    assert rc == pam._PAM_CONV_ERR
    assert len(allocated) == 3
    assert sorted(freed) == sorted(allocated)
    assert not responses[0]
