"""SOCKS 4a through a real proxy: OpenSSH's dynamic forwarding (`ssh -N -D`).

The fixture runs a private sshd on a free port with keys made in a temporary
directory, then `ssh -N -D` as the SOCKS proxy.
"""

import os
import socket
import subprocess

import pytest

import helpers
from emailrelay.config import options
from emailrelay.forward import smtp_client
from emailrelay.net import socks
from test_client import ScriptedServer, claim_one, put_message


@pytest.fixture(scope="module")
def socks_proxy(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("sshd"))
    for name in ("hostkey", "userkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, name)],
                       check=True)
    with open(os.path.join(d, "userkey.pub")) as src, open(os.path.join(d, "authorized_keys"), "w") as dst:
        dst.write(src.read())
    ssh_port = helpers.free_port()
    config = os.path.join(d, "sshd_config")
    with open(config, "w") as f:
        f.write("Port %d\nListenAddress 127.0.0.1\nHostKey %s/hostkey\n"
                "AuthorizedKeysFile %s/authorized_keys\nPasswordAuthentication no\n"
                "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
                "PidFile %s/sshd.pid\nAllowTcpForwarding yes\n" % (ssh_port, d, d, d))
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", config, "-E", os.path.join(d, "sshd.log")])
    socks_port = helpers.free_port()
    ssh = None
    try:
        helpers.wait_port(ssh_port)
        ssh = subprocess.Popen(["ssh", "-i", os.path.join(d, "userkey"), "-o", "StrictHostKeyChecking=no",
                                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                                "-p", str(ssh_port), "-N", "-D", "127.0.0.1:%d" % socks_port,
                                "root@127.0.0.1"], stdin=subprocess.DEVNULL)
        helpers.wait_port(socks_port, timeout=15)
        yield socks_port
    finally:
        for p in (ssh, sshd):
            if p is not None:
                helpers.stop_process(p)


def test_forwarding_through_ssh_dynamic_forwarding(tmp_path, socks_proxy):
    server = ScriptedServer()
    try:
        cfg = options.parse(["--forward-to", "localhost:%d@127.0.0.1:%d" % (server.port, socks_proxy),
                             "--spool-dir", str(tmp_path), "--domain", "client.test"])
        mid = put_message(tmp_path, b"Subject: via socks\r\n\r\nhi\r\n")
        client = smtp_client.Client(cfg)
        assert client.send(claim_one(tmp_path, mid)).ok
        client.quit()
        assert server.sessions[0]["data"] == b"Subject: via socks\r\n\r\nhi\r\n.\r\n"
    finally:
        server.close()


def test_socks_connect_returns_a_connected_socket(socks_proxy):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        sock = socks.connect("127.0.0.1", socks_proxy, "localhost", listener.getsockname()[1], 10)
        peer, _ = listener.accept()
        sock.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        peer.close()
        sock.close()
    finally:
        listener.close()


def test_proxy_failure_is_a_clear_connection_failure(tmp_path, socks_proxy):
    # OpenSSH closes the SOCKS connection when it cannot reach the target.
    closed_port = helpers.free_port()
    cfg = options.parse(["--forward-to", "localhost:%d@127.0.0.1:%d" % (closed_port, socks_proxy),
                         "--spool-dir", str(tmp_path)])
    with pytest.raises(smtp_client.ConnectionFailure,
                       match=r"SOCKS proxy 127.0.0.1:%d closed the connection while connecting "
                             r"to localhost:%d" % (socks_proxy, closed_port)):
        smtp_client.Client(cfg).connect()
