"""The http.client transport under httpx: framing, keep-alive, failures mapped to httpx errors.

A scripted raw-socket server answers each accepted connection with the bytes a
test gives, so cut-off bodies, closed keep-alive connections and stalls are real
socket behaviour, not mocks.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from lamina.registry.transport import StdlibTransport

Handler = Callable[[socket.socket, bytes], None]


def _read_request(conn: socket.socket) -> bytes:
    """Headers plus a Content-Length or chunked body."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = conn.recv(65536)
        if not got:
            return data
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < n:
            body += conn.recv(65536)
    elif b"transfer-encoding: chunked" in lower:
        while not body.endswith(b"0\r\n\r\n"):
            body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


class Server:
    def __init__(self, handler: Handler) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            while True:
                req = _read_request(conn)
                if not req:
                    return
                self.requests.append(req)
                try:
                    self.handler(conn, req)
                except OSError:
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], Server]]:
    servers: list[Server] = []

    def start(handler: Handler) -> Server:
        s = Server(handler)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def client(timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(transport=StdlibTransport(ssl.create_default_context()),
                        timeout=timeout)


def ok(body: bytes, close: bool = False) -> Handler:
    def h(conn: socket.socket, _req: bytes) -> None:
        extra = b"Connection: close\r\n" if close else b""
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra)
                     + body)
        if close:
            conn.shutdown(socket.SHUT_RDWR)
    return h


def test_body_streams_and_connection_is_reused(serve: Callable[[Handler], Server]) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: several chunks
    srv = serve(ok(body))
    with client() as c:
        for _ in range(3):
            with c.stream("GET", f"http://127.0.0.1:{srv.port}/blob") as r:
                assert r.status_code == 200
                assert b"".join(r.iter_raw()) == body
    assert srv.connections == 1  # keep-alive: one connection for three requests
    assert all(req.startswith(b"GET /blob HTTP/1.1\r\n") for req in srv.requests)


def test_query_and_headers_are_sent(serve: Callable[[Handler], Server]) -> None:
    srv = serve(ok(b"{}"))
    with client() as c:
        r = c.get(f"http://127.0.0.1:{srv.port}/v2/x?digest=sha256%3Aab&n=1",
                  headers={"Range": "bytes=5-"})
    assert r.json() == {}
    req = srv.requests[0]
    assert req.startswith(b"GET /v2/x?digest=sha256%3Aab&n=1 HTTP/1.1\r\n")
    assert b"\r\nRange: bytes=5-\r\n" in req
    assert req.count(b"\r\nHost: ") == 1


def test_chunked_request_body(serve: Callable[[Handler], Server]) -> None:
    srv = serve(ok(b""))
    with client() as c:
        r = c.put(f"http://127.0.0.1:{srv.port}/up", content=iter([b"abc", b"", b"defg"]))
    assert r.status_code == 200
    req = srv.requests[0]
    assert b"transfer-encoding: chunked" in req.lower()
    assert req.endswith(b"\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")


def test_server_closing_a_kept_connection_is_not_an_error(
        serve: Callable[[Handler], Server]) -> None:
    srv = serve(ok(b"hello", close=True))
    with client() as c:
        for _ in range(3):
            assert c.get(f"http://127.0.0.1:{srv.port}/").content == b"hello"
    assert srv.connections == 3


def test_body_cut_short_is_a_protocol_error(serve: Callable[[Handler], Server]) -> None:
    def short(conn: socket.socket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        conn.shutdown(socket.SHUT_RDWR)
        raise OSError  # end this connection

    srv = serve(short)
    with (client() as c, pytest.raises(httpx.RemoteProtocolError),
          c.stream("GET", f"http://127.0.0.1:{srv.port}/") as r):
        for _ in r.iter_raw():
            pass


def test_stalled_server_is_a_read_timeout(serve: Callable[[Handler], Server]) -> None:
    stop = threading.Event()

    def stall(_conn: socket.socket, _req: bytes) -> None:
        stop.wait(10)

    srv = serve(stall)
    try:
        with client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
            c.get(f"http://127.0.0.1:{srv.port}/")
    finally:
        stop.set()


def test_refused_connection_is_a_connect_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with client() as c, pytest.raises(httpx.ConnectError):
        c.get(f"http://127.0.0.1:{port}/")


def test_head_has_no_body(serve: Callable[[Handler], Server]) -> None:
    def head(conn: socket.socket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")

    srv = serve(head)
    with client() as c:
        for _ in range(2):
            r = c.head(f"http://127.0.0.1:{srv.port}/")
            assert r.headers["content-length"] == "1234" and r.content == b""
    assert srv.connections == 1
