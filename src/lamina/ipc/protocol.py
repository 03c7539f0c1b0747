"""Varlink framing on a unix stream socket, with file descriptors (SCM_RIGHTS).

A varlink message is a JSON object followed by one NUL byte.  Descriptors
travel as ancillary data attached to the *first* byte of the message they
belong to; JSON parameters refer to them by index into that message's list.

Associating descriptors with messages on a byte stream relies on how Linux
reads unix stream sockets: a ``recvmsg`` never continues past the segment
that carried descriptors.  So the descriptors of message M arrive in the read
that ends inside M (after its first byte, at or before its NUL), and the
receiver files each batch under the stream offset where that read ended.
Descriptors that end up attached to no message, or to a message that does not
use them, are closed, never leaked.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_MESSAGE = 8 << 20       # bytes of one JSON message; larger -> error and disconnect
MAX_FDS = 240               # descriptors attached to one message (kernel limit: 253)
_READ = 64 << 10
_ANC = socket.CMSG_SPACE(253 * array.array("i").itemsize)
SO_PEERGROUPS = 59          # Linux >= 4.13; not exported by the socket module


class ProtocolError(Exception):
    """The peer broke the framing rules; the connection cannot continue."""


class VarlinkError(Exception):
    """A varlink error reply: a qualified error name and its parameters."""

    def __init__(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(name)
        self.name = name
        self.parameters = parameters or {}

    def __str__(self) -> str:
        msg = self.parameters.get("message")
        return f"{self.name}: {msg}" if msg else f"{self.name} {self.parameters}"


@dataclass
class Message:
    body: dict[str, Any]
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        close_all(self.fds)
        for i in range(len(self.fds)):
            self.fds[i] = -1


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def close_all(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def peer_cred(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    try:
        g = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = tuple(array.array("I", g[:len(g) - len(g) % 4]))
    except OSError:
        pass
    return PeerCred(pid, uid, gid, groups)


def encode(body: dict[str, Any], max_message: int = MAX_MESSAGE) -> bytes:
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) >= max_message:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {max_message}-byte limit")
    return data + b"\0"


class Channel:
    """One varlink connection over a non-blocking unix socket, driven by asyncio."""

    def __init__(self, sock: socket.socket, *, max_message: int = MAX_MESSAGE,
                 max_fds: int = MAX_FDS) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.max_message = max_message
        self.max_fds = max_fds
        self._buf = bytearray()
        self._buf_start = 0             # stream offset of _buf[0]
        self._received = 0              # stream bytes received so far
        self._fds: deque[tuple[int, int]] = deque()    # (offset where the read ended, fd)
        self._wlock = asyncio.Lock()
        self.closed = False

    # -- waiting on the socket -------------------------------------------------
    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if writable:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            if writable:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    # -- receiving -------------------------------------------------------------
    def _take_fds(self, start: int, end: int) -> list[int]:
        out: list[int] = []
        while self._fds and self._fds[0][0] <= end:
            off, fd = self._fds.popleft()
            if off <= start:    # arrived with no message's first byte: stray, drop it
                close_all([fd])
            else:
                out.append(fd)
        return out

    async def recv(self) -> Message | None:
        """The next message, or None on a clean end of stream between messages.

        Raises :class:`ProtocolError` on an oversized message, bad JSON, a
        non-object message or a stream cut inside a message.
        """
        while True:
            i = self._buf.find(b"\0")
            if i >= 0:
                start = self._buf_start
                end = start + i + 1
                data = bytes(self._buf[:i])
                del self._buf[:i + 1]
                self._buf_start = end
                fds = self._take_fds(start, end)
                if i >= self.max_message:
                    close_all(fds)
                    raise ProtocolError(f"message exceeds the {self.max_message}-byte limit")
                if len(fds) > self.max_fds:
                    close_all(fds)
                    raise ProtocolError(f"{len(fds)} descriptors attached to one message "
                                        f"(limit {self.max_fds})")
                try:
                    body = json.loads(data)
                except (ValueError, UnicodeDecodeError) as e:
                    close_all(fds)
                    raise ProtocolError(f"message is not valid JSON: {e}") from None
                if not isinstance(body, dict):
                    close_all(fds)
                    raise ProtocolError("message is not a JSON object")
                return Message(body, fds)
            if len(self._buf) >= self.max_message:
                raise ProtocolError(f"message exceeds the {self.max_message}-byte limit")
            try:
                data, anc, flags, _ = self.sock.recvmsg(_READ, _ANC, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                await self._wait(False)
                continue
            except (ConnectionResetError, OSError) as e:
                if isinstance(e, ConnectionResetError) or self.closed:
                    data, anc, flags = b"", [], 0
                else:
                    raise
            got: list[int] = []
            for level, typ, payload in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    got.extend(a)
            if flags & socket.MSG_CTRUNC:
                close_all(got)
                raise ProtocolError("too many descriptors in one message (truncated)")
            self._received += len(data)
            for fd in got:
                self._fds.append((self._received, fd))
            if not data:
                if self._buf:
                    raise ProtocolError("connection closed in the middle of a message")
                return None
            self._buf += data

    # -- sending ---------------------------------------------------------------
    async def send(self, body: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one message; *fds* (still owned by the caller) ride on its first byte."""
        if len(fds) > self.max_fds:
            raise ProtocolError(f"{len(fds)} descriptors for one message (limit {self.max_fds})")
        data = memoryview(encode(body, self.max_message))
        async with self._wlock:
            pending_fds = bool(fds)
            while data:
                if self.closed:
                    raise ConnectionResetError("varlink connection closed")
                try:
                    if pending_fds:
                        n = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                        array.array("i", fds))])
                        pending_fds = False
                    else:
                        n = self.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    await self._wait(True)
                    continue
                data = data[n:]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        close_all([fd for _, fd in self._fds])
        self._fds.clear()
        try:
            self.sock.close()
        except OSError:
            pass
