"""A counting TCP proxy on 127.0.0.1: every byte between a client and a server, counted
at the socket (what the server really sent), not by the client's own bookkeeping."""
from __future__ import annotations

import socket
import threading


class CountingProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream`` (host, port); ``down``: bytes the server
    sent to clients, ``up``: bytes clients sent; ``reset()`` zeroes both.  Stop with
    ``close()`` (threads are daemons: nothing outlives the process)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.down = self.up = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.down = self.up = 0

    def _add(self, downstream: bool, n: int) -> None:
        with self._lock:
            if downstream:
                self.down += n
            else:
                self.up += n

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for a, b, down in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(a, b, down), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                self._add(down, len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # one side closed: close both, the other pump ends too
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()
