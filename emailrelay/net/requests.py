"""What a session conversation yields where it would block, and what it gets back.

A conversation (a generator: `SmtpSession.conversation()` and the others)
never blocks itself. Where it would, it yields one of these requests, as in
`line = yield requests.line(512)`, and its driver (the session loop, or
`session_loop.drive` in a thread) answers it:

    line(limit)             -> one input line (bytes, b'' at end of input),
                               or connection.LineTooLong thrown in
    read(n)                 -> at most n octets (b'' at end of input)
    call(fn, *args)         -> fn(*args)'s result, or its exception thrown in
    work(fn, args, waited)  -> the same, for work that often waits little for
                               its device: waited() is the seconds the
                               calling thread has waited so far, and the
                               driver decides where it runs (see session_loop)
    sleep(seconds)          -> None after that long (sooner at shutdown)
    starttls(context)       -> None once TLS is up, or the handshake's error

An idle timeout (the connection's `settimeout`) throws connection.Timeout in
at a line or read request. On the wire between a conversation and its
driver a request is a tuple whose first item is its kind (LINE, READ, ...);
these functions only build it (a plain tuple, not a generator to delegate
to: a conversation makes several requests per message).
"""

LINE, READ, CALL, WORK, SLEEP, STARTTLS = "line", "read", "call", "work", "sleep", "starttls"


def line(limit):
    """One input line of at most `limit` octets (see the module docstring)."""
    return (LINE, limit)


def read(n):
    """At most `n` octets of input; b'' at its end."""
    return (READ, n)


def call(fn, *args):
    """fn(*args) where it may block: in a thread of the driver's pool."""
    return (CALL, fn, args)


def work(fn, args, waited):
    """fn(*args), run in place or in the pool as `waited` says it tends to wait."""
    return (WORK, fn, args, waited)


def sleep(seconds):
    """Waits `seconds` (less when the program stops)."""
    return (SLEEP, seconds)


def starttls(context):
    """Upgrades the connection to TLS as the server side."""
    return (STARTTLS, context)
