"""The in-memory connection that session tests drive protocols through."""

from emailrelay.net import connection


class MemoryConnection(connection.Buffered):
    """A `Connection` look-alike over bytes, for testing sessions.

    The whole input is given up front (it may be a list of chunks, each
    returned by one receive, to exercise buffering); `output` collects what
    the session wrote, flushed or not.
    """

    def __init__(self, data=b"", peer=("127.0.0.1", 40000), local=("127.0.0.1", 25)):
        super().__init__()
        self._chunks = list(data) if isinstance(data, list) else [data]
        self.output = bytearray()
        self.peer = peer
        self.local = local
        self.closed = False
        self.timeout = None

    def _recv(self):
        while self._chunks:
            chunk = self._chunks.pop(0)
            if chunk:
                return chunk
        return b""

    def _send(self, data):
        self.output += data

    def write(self, data):
        self.output += data

    def flush(self):
        pass

    def settimeout(self, seconds):
        self.timeout = seconds

    def starttls(self, context):
        raise OSError("TLS is not available on a memory connection")

    def close(self):
        self.closed = True
