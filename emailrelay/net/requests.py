"""What a session conversation yields where it would block, and what it gets back.

A conversation (a generator: `SmtpSession.conversation()` and the others)
never blocks itself. Where it would, it yields one of these requests, as in
`line = yield requests.line(512)`, and its driver (the session loop, or
`thread_driver.drive` in a thread) answers it:

    line(limit)        -> one input line (bytes, b'' at end of input),
                          or connection.LineTooLong thrown in
    read(n)            -> at most n octets (b'' at end of input)
    call(fn, *args)    -> fn(*args)'s result, or its exception thrown in
    sleep(seconds)     -> None after that long (sooner at shutdown)
    starttls(context)  -> None once TLS is up, or the handshake's error

A conversation never says where a call runs: the driver chooses (the
session loop gives most calls to its pool, and may run a function marked
`runtime.device_waits.device_bound` in its own thread while it waits
little).

An idle timeout (the connection's `settimeout`) throws connection.Timeout in
at a line or read request. On the wire between a conversation and its
driver a request is a tuple whose first item is its kind (LINE, READ, ...);
these functions only build it (a plain tuple, not a generator to delegate
to: a conversation makes several requests per message).
"""

LINE, READ, CALL, SLEEP, STARTTLS = "line", "read", "call", "sleep", "starttls"


def line(limit):
    """One input line of at most `limit` octets (see the module docstring)."""
    return (LINE, limit)


def read(n):
    """At most `n` octets of input; b'' at its end."""
    return (READ, n)


def call(fn, *args):
    """fn(*args), which may block: wherever the driver chooses to run it."""
    return (CALL, fn, args)


def sleep(seconds):
    """Waits `seconds` (less when the program stops)."""
    return (SLEEP, seconds)


def starttls(context):
    """Upgrades the connection to TLS as the server side."""
    return (STARTTLS, context)
