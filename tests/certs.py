"""Test certificates made with the openssl command line, once per test session.

`certs` is a session-scoped pytest fixture (import it into a test module)
giving a namespace of file paths:

- `ca`: a test CA certificate (PEM) that signed the next three;
- `server`: key and certificate in one PEM for CN=localhost with
  subjectAltName DNS:localhost and IP:127.0.0.1; `server_key`/`server_crt`
  the same in two files;
- `client`: key and certificate in one PEM for CN=client.test;
  `client_key`/`client_crt` the same in two files;
- `bad`: a self-signed key and certificate in one PEM, also CN=localhost
  (an impostor server and an unknown client); `bad_crt` its certificate
  alone, usable as a wrong CA file.
"""

import os
import subprocess
import types

import pytest


def _openssl(cwd, *args):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def _cat(directory, out, *parts):
    with open(os.path.join(directory, out), "wb") as f:
        for p in parts:
            with open(os.path.join(directory, p), "rb") as g:
                f.write(g.read())


def make_certs(directory):
    """Creates the certificates in `directory`; returns the namespace described above."""
    d = str(directory)
    days = ("-days", "2")
    _openssl(d, "req", "-x509", "-nodes", "-newkey", "rsa:2048", *days, "-subj", "/CN=Test CA",
             "-keyout", "ca.key", "-out", "ca.pem")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, cn, ext in (("server", "localhost", ["-extfile", "san.ext"]),
                          ("client", "client.test", [])):
        _openssl(d, "req", "-nodes", "-newkey", "rsa:2048", "-subj", "/CN=" + cn,
                 "-keyout", name + ".key", "-out", name + ".csr")
        _openssl(d, "x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", *days, "-out", name + ".crt", *ext)
        _cat(d, name + ".pem", name + ".key", name + ".crt")
    _openssl(d, "req", "-x509", "-nodes", "-newkey", "rsa:2048", *days, "-subj", "/CN=localhost",
             "-keyout", "bad.key", "-out", "bad.crt")
    _cat(d, "bad.pem", "bad.key", "bad.crt")
    names = ("ca.pem", "server.pem", "server.key", "server.crt", "client.pem", "client.key",
             "client.crt", "bad.pem", "bad.crt")
    return types.SimpleNamespace(**{
        ("ca" if n == "ca.pem" else n.replace(".pem", "").replace(".", "_")): os.path.join(d, n)
        for n in names})


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """The test certificates (see the module docstring)."""
    return make_certs(tmp_path_factory.mktemp("certs"))
