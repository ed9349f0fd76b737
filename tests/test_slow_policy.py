"""Slow policy of some sessions (DNS block lists, filters) does not hold up the others.

Forty hostile sessions wait on policy that does not answer: a DNS block
list forwarded by dnsmasq to a UDP socket that never answers, a `net:`
filter daemon that never answers, or a filter program that runs until the
test ends. Meanwhile an unrelated client, whose own policy answers at
once, gets its greeting and completes a whole transaction (with AUTH)
within 2 s, the bound being the point of these tests. And with
--filter-timeout N, forty silent `net:` filter requests are all answered
about N seconds after they were made.
"""

import base64
import os
import select
import smtplib
import socket
import subprocess
import time

import pytest

from daemons import HANG, LineDaemon
from emailrelay.util import dns
from helpers import Relay, SmtpChat, free_port, wait_for

HOSTILE = 40
# What an unrelated client may take for its greeting and whole transaction.
PROMPT = 2.0


def _start_slow_message(port):
    """A session (SmtpChat) that has sent a message containing SLOW, all but its final dot."""
    chat = SmtpChat(port, timeout=30)
    assert chat.greeting.startswith("220 ")
    for command in ("EHLO hostile.test",
                    "AUTH PLAIN " + base64.b64encode(b"\0alice\0secret").decode(),
                    "MAIL FROM:<a@x.test>", "RCPT TO:<b@y.test>", "DATA"):
        assert chat.cmd(command)[:1] in "23"
    chat.send(b"Subject: slow\r\n\r\nSLOW\r\n")
    return chat


def _unrelated_transaction(port):
    """A whole transaction with AUTH by a client whose policy answers at once; its seconds."""
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        c.login("alice", "secret")
        c.sendmail("a@x.test", ["b@y.test"], b"Subject: unrelated\r\n\r\nquick\r\n")
    return time.monotonic() - start


@pytest.fixture
def secrets(tmp_path):
    path = tmp_path / "secrets"
    path.write_text("server plain alice secret\n")
    return str(path)


@pytest.fixture
def dnsmasq(tmp_path):
    """A DNS server for list bl.test: 127.0.0.2 is forwarded to a UDP socket that
    never answers; any other address gets NXDOMAIN at once."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    port = free_port()
    proc = subprocess.Popen(
        ["dnsmasq", "--no-daemon", "--port=%d" % port, "--listen-address=127.0.0.1",
         "--bind-interfaces", "--no-resolv", "--no-hosts", "--local=/bl.test/", "--pid-file=",
         "--server=/2.0.0.127.bl.test/127.0.0.1#%d" % silent.getsockname()[1]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(0.2)
            u.sendto(dns.query("1.0.0.127.bl.test", dns.A, 1), ("127.0.0.1", port))
            try:
                return dns.parse(u.recv(512)).rcode == dns.NXDOMAIN
            except socket.timeout:
                return False
    try:
        wait_for(answers, what="dnsmasq")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        silent.close()


def test_a_client_is_greeted_and_served_while_forty_wait_on_a_silent_block_list(
        tmp_path, dnsmasq, secrets, monkeypatch):
    monkeypatch.setenv("EMAILRELAY_DNSBL_CHECK_LOCAL", "1")
    args = ["--dnsbl", "127.0.0.1:%d,60000,1,bl.test" % dnsmasq, "--server-auth", secrets,
            "--max-connections-per-address", "100"]
    held = []
    with Relay(tmp_path, args) as relay:
        try:
            for _ in range(HOSTILE):
                held.append(socket.create_connection(("127.0.0.1", relay.port), timeout=30,
                                                     source_address=("127.0.0.2", 0)))
            wait_for(lambda: relay.log().count("smtp connection from 127.0.0.2") == HOSTILE,
                     what="the hostile connections")
            took = _unrelated_transaction(relay.port)
            # The hostile sessions are still waiting for their greeting.
            assert not select.select(held, [], [], 0)[0]
        finally:
            for s in held:
                s.close()
        assert len(relay.files(".envelope")) == 1
    assert took < PROMPT, "the unrelated transaction took %.1fs" % took


def _slow_content(line):
    with open(line, "rb") as f:
        return HANG if b"SLOW" in f.read() else b"ok\n"


def _hold_slow_messages(port, started):
    """Forty sessions whose messages are with the slow filter; `started()` counts them."""
    sessions = [_start_slow_message(port) for _ in range(HOSTILE)]
    for chat in sessions:
        chat.send(b".\r\n")
    wait_for(lambda: started() == HOSTILE, what="the filter to have every hostile message")
    return sessions


def test_a_client_is_served_while_forty_messages_wait_on_a_silent_net_filter(tmp_path, secrets):
    with LineDaemon(_slow_content) as daemon:
        args = ["--filter", "net:" + daemon.address, "--filter-timeout", "120",
                "--server-auth", secrets, "--max-connections-per-address", "100"]
        with Relay(tmp_path, args) as relay:
            sessions = _hold_slow_messages(relay.port, lambda: len(daemon.requests))
            try:
                took = _unrelated_transaction(relay.port)
                assert not select.select([c.sock for c in sessions], [], [], 0)[0]
            finally:
                for chat in sessions:
                    chat.close()
            assert len(relay.files(".envelope")) == 1
    assert took < PROMPT, "the unrelated transaction took %.1fs" % took


def test_a_client_is_served_while_forty_messages_wait_on_a_slow_filter_program(
        tmp_path, secrets):
    # The filter holds a SLOW message until the test closes the FIFO (30 s
    # and more), and passes any other at once.
    fifo = tmp_path / "hold"
    os.mkfifo(str(fifo))
    marks = tmp_path / "marks"
    marks.mkdir()
    flt = tmp_path / "filter"
    flt.write_text('#!/bin/sh\nif grep -q SLOW "$1"; then touch %s/$$; read x < %s; fi\nexit 0\n'
                   % (marks, fifo))
    flt.chmod(0o755)
    # Open for reading and writing: never blocks, and while it is open the
    # filters' reads wait; closing it gives them end of input.
    hold = os.open(str(fifo), os.O_RDWR)
    try:
        args = ["--filter", str(flt), "--filter-timeout", "120", "--server-auth", secrets,
                "--max-connections-per-address", "100"]
        with Relay(tmp_path, args) as relay:
            sessions = _hold_slow_messages(relay.port, lambda: len(os.listdir(str(marks))))
            try:
                took = _unrelated_transaction(relay.port)
                assert not select.select([c.sock for c in sessions], [], [], 0)[0]
            finally:
                for chat in sessions:
                    chat.close()
            assert len(relay.files(".envelope")) == 1
    finally:
        os.close(hold)
    assert took < PROMPT, "the unrelated transaction took %.1fs" % took


def test_the_filter_timeout_holds_for_each_of_forty_silent_net_filter_requests(
        tmp_path, secrets):
    timeout = 4.0
    with LineDaemon(lambda line: HANG) as daemon:
        args = ["--filter", "net:" + daemon.address, "--filter-timeout", "%g" % timeout,
                "--server-auth", secrets, "--max-connections-per-address", "100"]
        with Relay(tmp_path, args) as relay:
            sessions = [_start_slow_message(relay.port) for _ in range(HOSTILE)]
            sent = {}
            for chat in sessions:
                chat.send(b".\r\n")
                sent[chat] = time.monotonic()
            took = {}
            try:
                for chat in sessions:
                    reply = chat.reply()
                    took[chat] = time.monotonic() - sent[chat]
                    assert reply == "452 failed"
            finally:
                for chat in sessions:
                    chat.close()
            assert len(daemon.requests) == HOSTILE
    slowest = max(took.values())
    # Every request had its full time, and none waited for another's.
    assert min(took.values()) >= timeout * 0.9
    assert slowest < 2 * timeout, "the last reply came after %.1fs" % slowest
