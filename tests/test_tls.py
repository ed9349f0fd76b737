"""TLS contexts and client TLS: STARTTLS, implicit TLS, verification, SNI.

Certificates are made by the tests with openssl: a test CA, a server
certificate it signed (CN next.test), a self-signed impostor, and a client
certificate. The next hop is the scripted server from test_client with a
server context made by `tls.server_context` itself.
"""

import ssl
import subprocess
import types

import pytest

from emailrelay.config import options
from emailrelay.forward import smtp_client
from emailrelay.net import tls
from test_client import ScriptedServer, claim_one, put_message


def _openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    cwd = str(d)
    _openssl("req", "-x509", "-nodes", "-newkey", "rsa:2048", "-days", "2", "-subj", "/CN=Test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=cwd)
    for name, cn in (("server", "next.test"), ("client", "client.test")):
        _openssl("req", "-nodes", "-newkey", "rsa:2048", "-subj", "/CN=%s" % cn,
                 "-keyout", name + ".key", "-out", name + ".csr", cwd=cwd)
        _openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", name + ".crt", cwd=cwd)
        (d / (name + ".pem")).write_bytes((d / (name + ".key")).read_bytes()
                                          + (d / (name + ".crt")).read_bytes())
    _openssl("req", "-x509", "-nodes", "-newkey", "rsa:2048", "-days", "2", "-subj", "/CN=next.test",
             "-keyout", "impostor.pem", "-out", "impostor.pem", cwd=cwd)
    return types.SimpleNamespace(**{n: str(d / f) for n, f in (
        ("ca", "ca.pem"), ("server", "server.pem"), ("server_key", "server.key"),
        ("server_crt", "server.crt"), ("client", "client.pem"), ("impostor", "impostor.pem"))})


def server_ctx(tmp_path, *args):
    return tls.server_context(options.parse(["--spool-dir", str(tmp_path), "--server-tls"] + list(args)))


def client_for(tmp_path, port, *args):
    cfg = options.parse(["--forward-to", "127.0.0.1:%d" % port, "--spool-dir", str(tmp_path),
                         "--domain", "client.test"] + list(args))
    return smtp_client.Client(cfg, None, tls.client_context(cfg))


def send_one(tmp_path, client):
    mid = put_message(tmp_path, b"Subject: tls\r\n\r\nsecret\r\n")
    try:
        return client.send(claim_one(tmp_path, mid))
    finally:
        client.quit()


# -- contexts ------------------------------------------------------------------

def bare_cfg(**given):
    """A configuration as tls.py reads it, for checks options.parse would stop first."""
    # Parsed options are read-only: a look-alike with the values changed.
    values = dict(vars(options.parse(["--spool-dir", "/tmp"])), **given)
    return types.SimpleNamespace(**values)


def test_tls_config_keywords(tmp_path, certs):
    ctx = server_ctx(tmp_path, "--server-tls-certificate", certs.server, "--tls-config", "tlsv1.2,-tlsv1.2")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError, match="unknown keyword 'tlsv9'"):
        tls.server_context(bare_cfg(server_tls=True, server_tls_certificate=[certs.server],
                                    tls_config="tlsv9"))


def test_server_needs_a_certificate(tmp_path):
    with pytest.raises(ValueError, match="--server-tls-certificate"):
        tls.server_context(bare_cfg(server_tls=True, server_tls_certificate=None))


def test_no_context_without_tls_options(tmp_path):
    cfg = options.parse(["--spool-dir", str(tmp_path), "--forward-to", "127.0.0.1:25"])
    assert tls.server_context(cfg) is None and tls.client_context(cfg) is None


# -- client TLS against a TLS next hop ----------------------------------------------

def test_starttls_with_key_and_certificate_in_two_files(tmp_path, certs):
    ctx = server_ctx(tmp_path, "--server-tls-certificate", certs.server_key,
                     "--server-tls-certificate", certs.server_crt)
    server = ScriptedServer(tls=ctx)
    try:
        assert send_one(tmp_path, client_for(tmp_path, server.port, "--client-tls")).ok
        s = server.sessions[0]
        assert s["tls"] and s["commands"].count("EHLO client.test") == 2
        assert s["commands"][1] == "STARTTLS"
        assert s["data"] == b"Subject: tls\r\n\r\nsecret\r\n.\r\n"
    finally:
        server.close()


def test_client_tls_required_fails_without_starttls(tmp_path):
    server = ScriptedServer()
    try:
        with pytest.raises(smtp_client.ConnectionFailure, match="does not offer STARTTLS"):
            send_one(tmp_path, client_for(tmp_path, server.port, "--client-tls", "--client-tls-required"))
        assert not any(c.startswith("MAIL") for c in server.sessions[0]["commands"])
    finally:
        server.close()


def test_client_tls_goes_plain_when_starttls_is_not_offered(tmp_path):
    server = ScriptedServer()
    try:
        assert send_one(tmp_path, client_for(tmp_path, server.port, "--client-tls")).ok
        assert not server.sessions[0]["tls"]
    finally:
        server.close()


@pytest.mark.parametrize("which, verify, ok", [
    ("server", True, True),
    ("impostor", True, False),
    ("impostor", False, True),
])
def test_server_certificate_verification(tmp_path, certs, which, verify, ok):
    ctx = server_ctx(tmp_path, "--server-tls-certificate", getattr(certs, which))
    server = ScriptedServer(tls=ctx, implicit=True)
    args = ["--client-tls-connection"] + (["--client-tls-verify", certs.ca] if verify else [])
    try:
        client = client_for(tmp_path, server.port, *args)
        if ok:
            assert send_one(tmp_path, client).ok
            assert server.sessions[0]["tls"]
        else:
            with pytest.raises(smtp_client.ConnectionFailure, match="certificate verification failed"):
                send_one(tmp_path, client)
    finally:
        server.close()


@pytest.mark.parametrize("name, ok", [("next.test", True), ("other.test", False)])
def test_verify_name(tmp_path, certs, name, ok):
    ctx = server_ctx(tmp_path, "--server-tls-certificate", certs.server)
    server = ScriptedServer(tls=ctx, implicit=True)
    try:
        client = client_for(tmp_path, server.port, "--client-tls-connection", "--client-tls-verify",
                            certs.ca, "--client-tls-verify-name", name)
        if ok:
            assert send_one(tmp_path, client).ok
        else:
            with pytest.raises(smtp_client.ConnectionFailure, match="names 'next.test', not 'other.test'"):
                send_one(tmp_path, client)
    finally:
        server.close()


def test_server_name_is_sent_as_sni(tmp_path, certs):
    ctx = server_ctx(tmp_path, "--server-tls-certificate", certs.server)
    names = []
    ctx.sni_callback = lambda sock, name, context: names.append(name)
    server = ScriptedServer(tls=ctx, implicit=True)
    try:
        assert send_one(tmp_path, client_for(tmp_path, server.port, "--client-tls-connection",
                                             "--client-tls-server-name", "sni.test")).ok
        assert names == ["sni.test"]
    finally:
        server.close()


@pytest.mark.parametrize("present", [True, False])
def test_client_certificate_for_a_verifying_server(tmp_path, certs, present):
    ctx = server_ctx(tmp_path, "--server-tls-certificate", certs.server, "--server-tls-verify", certs.ca)
    server = ScriptedServer(tls=ctx)
    args = ["--client-tls"] + (["--client-tls-certificate", certs.client] if present else [])
    try:
        client = client_for(tmp_path, server.port, *args)
        if present:
            assert send_one(tmp_path, client).ok
            assert server.sessions[0]["tls"]
        else:
            with pytest.raises(smtp_client.ConnectionFailure):
                send_one(tmp_path, client)
            assert not any(c.startswith("MAIL") for c in server.sessions[0]["commands"])
    finally:
        server.close()
