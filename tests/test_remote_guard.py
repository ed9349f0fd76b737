"""The open-relay guard: a non-local client without --remote-clients learns why it is refused.

The relay and its client run in a network namespace of their own
(`unshare --net`) whose loopback interface also has 192.0.2.1, a
documentation address that is not local: the only way to be a non-local
client without sending anything beyond this host.
"""

import json
import subprocess
import sys

from helpers import ROOT, env

TESTS = ROOT + "/tests"

SCRIPT = r'''
import json, socket, sys
sys.path.insert(0, %(tests)r)
from helpers import Relay

def first_reply(port):
    s = socket.socket()
    s.settimeout(10)
    s.bind(("192.0.2.1", 0))
    s.connect(("192.0.2.1", port))
    data = b""
    while True:
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.decode()

with open(sys.argv[1] + "/pop.auth", "w") as f:
    f.write("server plain bob secret\n")
with Relay(sys.argv[1], ["--interface", "192.0.2.1", "--pop-auth", sys.argv[1] + "/pop.auth"],
           pop=True) as relay:
    out = {"smtp": first_reply(relay.port), "pop": first_reply(relay.pop_port)}
    relay.wait_log("pop: connection refused from non-local address 192.0.2.1")
    out["log"] = relay.log()
print(json.dumps(out))
'''


def test_a_non_local_client_gets_554_and_the_reason_before_the_close(tmp_path):
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c",
         'ip link set lo up && ip addr add 192.0.2.1/32 dev lo && exec "$@"', "sh",
         sys.executable, "-c", SCRIPT % {"tests": TESTS}, str(tmp_path)],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
        timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["smtp"] == "554 no SMTP service for your address\r\n"
    assert out["pop"] == "-ERR no POP service for your address\r\n"
    assert "smtp: connection refused from non-local address 192.0.2.1 (see --remote-clients)" \
        in out["log"]
