"""Driving a protocol conversation in the calling thread, over a blocking connection.

A conversation (`requests`) is answered here with blocking calls on
`session.conn`: every "call" runs in place. This is how a session thread,
--inetd, --bsmtp and the tests run one; the session loop hands a
conversation that starts TLS to a thread that goes on with `drive_from`.
"""

import time

from . import requests


def drive(session, stop_event=None):
    """Runs `session.conversation()` to its end in this thread, then closes its connection.

    Requests are served by blocking calls on `session.conn`; a "sleep" ends
    early when `stop_event` is set.
    """
    drive_from(session, session.conversation(), None, stop_event)


def drive_from(session, gen, request, stop_event):
    """Runs conversation `gen` on to its end as `drive` does, from `request`.

    `request` is the one `gen` yielded last, served first (None for a
    conversation not yet started). A request's error is thrown into `gen`;
    `gen` and `session.conn` are closed however it ends.
    """
    value = exc = None
    try:
        while True:
            if request is not None:
                value = exc = None
                try:
                    value = _serve(session.conn, request, stop_event)
                except Exception as e:
                    exc = e
            try:
                request = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration:
                return
            value = exc = None
    finally:
        gen.close()
        session.conn.close()


def _serve(conn, request, stop_event):
    kind = request[0]
    if kind == requests.LINE:
        return conn.readline(request[1])
    if kind == requests.READ:
        return conn.read(request[1])
    if kind == requests.CALL:
        return request[1](*request[2])
    if kind == requests.SLEEP:
        if stop_event is not None:
            stop_event.wait(request[1])
        else:
            time.sleep(request[1])
        return None
    if kind == requests.STARTTLS:
        conn.starttls(request[1])
        return None
    raise ValueError("unknown conversation request %r" % (kind,))
