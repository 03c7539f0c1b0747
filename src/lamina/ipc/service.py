"""A varlink server on a unix socket: dispatch, ``more``/``oneway``, introspection.

Requests on one connection are handled in order, one at a time (varlink's
rule); connections are independent asyncio tasks.  Blocking work belongs in
threads (the store service does its streaming there).

Security: the socket is created 0600 (umask held around bind), every peer is
checked with SO_PEERCRED (the server's own uid and root by default, optionally
members of one group), messages are bounded, and descriptors received with a
message are closed unless a handler takes them, on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lamina import __version__
from lamina.errors import EnvironmentError_, LaminaError, UsageError
from lamina.ipc.protocol import (
    MAX_FDS,
    MAX_MESSAGE,
    Channel,
    Message,
    PeerCred,
    ProtocolError,
    VarlinkError,
    close_all,
    peer_cred,
)

log = logging.getLogger("lamina.ipc")

SERVICE = "org.varlink.service"
SERVICE_IDL = """\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
"""


def invalid(parameter: str) -> VarlinkError:
    return VarlinkError(f"{SERVICE}.InvalidParameter", {"parameter": parameter})


class Call:
    """One method call as a handler sees it.

    ``fds`` are the descriptors that came with the request; a handler takes
    ownership of one with :meth:`take_fd`; all others are closed when the call
    ends.  Replies with ``continues=True`` need a caller that asked for ``more``.
    """

    def __init__(self, channel: Channel, msg: Message, method: str, peer: PeerCred) -> None:
        self.channel = channel
        self.method = method
        params = msg.body.get("parameters", {})
        self.parameters: dict[str, Any] = params if isinstance(params, dict) else {}
        self.more = msg.body.get("more") is True
        self.oneway = msg.body.get("oneway") is True
        self.fds = msg.fds
        self.peer = peer
        self.replied_final = False

    def take_fd(self, parameter: str, value: object) -> int:
        """The descriptor a parameter refers to by index; the caller now owns it."""
        if isinstance(value, bool) or not isinstance(value, int) or \
                not 0 <= value < len(self.fds) or self.fds[value] < 0:
            raise invalid(parameter)
        fd = self.fds[value]
        self.fds[value] = -1
        return fd

    def close_fds(self) -> None:
        close_all(self.fds)
        for i in range(len(self.fds)):   # in place: the message shares this list
            self.fds[i] = -1

    async def reply(self, parameters: dict[str, Any] | None = None, *,
                    fds: list[int] | tuple[int, ...] = (), continues: bool = False) -> None:
        """Send a reply; the descriptors are sent, then closed here (ownership passes)."""
        try:
            if continues and not self.more:
                raise VarlinkError(f"{SERVICE}.ExpectedMore")
            if self.oneway:
                return
            body: dict[str, Any] = {"parameters": parameters or {}}
            if continues:
                body["continues"] = True
            await self.channel.send(body, fds)
            if not continues:
                self.replied_final = True
        finally:
            close_all(list(fds))


Handler = Callable[[Call], Awaitable[dict[str, Any] | None]]


@dataclass
class Interface:
    """A varlink interface: its name, IDL text and handlers by method name."""

    name: str
    description: str
    methods: dict[str, Handler] = field(default_factory=dict)
    # methods only the server's own uid or root may call (not an allowed group)
    privileged: frozenset[str] = frozenset()
    error_for: Callable[[BaseException], VarlinkError] | None = None


@dataclass(frozen=True)
class ServerOptions:
    socket_path: str
    mode: int = 0o600
    allow_gid: int | None = None        # also admit peers in this group
    max_message: int = MAX_MESSAGE
    max_fds: int = MAX_FDS
    max_connections: int = 512
    vendor: str = "lamina"
    product: str = "lamina"
    url: str = "https://github.com/lamina/lamina"


class VarlinkServer:
    def __init__(self, options: ServerOptions, interfaces: list[Interface]) -> None:
        self.options = options
        self.interfaces = {i.name: i for i in interfaces}
        self._server_sock: socket.socket | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None
        self.uid = os.geteuid()

    # -- lifecycle -------------------------------------------------------------
    def _bind(self) -> socket.socket:
        path = self.options.socket_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise UsageError(f"{path} exists and is not a socket",
                                 hint="choose another --socket path")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)    # stale socket of a dead server
            else:
                raise UsageError(f"a server is already listening on {path}",
                                 hint="stop it or choose another --socket path")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)   # no window in which the socket is reachable by others
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            raise EnvironmentError_(f"cannot bind {path}: {e.strerror}",
                                    hint="check that the directory exists and is writable"
                                    ) from None
        finally:
            os.umask(old)
        os.chmod(path, self.options.mode)
        s.listen(128)
        s.setblocking(False)
        return s

    async def start(self) -> None:
        self._server_sock = self._bind()
        self._accept_task = asyncio.create_task(self._accept_loop())

    async def serve_forever(self) -> None:
        if self._accept_task is None:
            await self.start()
        assert self._accept_task is not None
        await self._accept_task

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server_sock is not None:
            self._server_sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.options.socket_path)
            self._server_sock = None

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._server_sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._server_sock)
            conn.set_inheritable(False)
            if len(self._conns) >= self.options.max_connections:
                conn.close()
                continue
            t = asyncio.create_task(self._connection(conn))
            self._conns.add(t)
            t.add_done_callback(self._conns.discard)

    # -- one connection --------------------------------------------------------
    def allowed(self, peer: PeerCred) -> bool:
        if peer.uid in (0, self.uid):
            return True
        gid = self.options.allow_gid
        return gid is not None and (peer.gid == gid or gid in peer.groups)

    async def _connection(self, sock: socket.socket) -> None:
        ch = Channel(sock, max_message=self.options.max_message, max_fds=self.options.max_fds)
        try:
            peer = peer_cred(sock)
            if not self.allowed(peer):
                log.warning("refused connection from uid %d pid %d", peer.uid, peer.pid)
                return
            while True:
                try:
                    msg = await ch.recv()
                except ProtocolError as e:
                    log.info("dropping connection (pid %d): %s", peer.pid, e)
                    return
                if msg is None:
                    return
                try:
                    await self._dispatch(ch, msg, peer)
                except (ConnectionError, BrokenPipeError):
                    return
                except ProtocolError as e:
                    log.info("dropping connection (pid %d): %s", peer.pid, e)
                    return
                finally:
                    msg.close_fds()
        except asyncio.CancelledError:
            pass
        finally:
            ch.close()

    async def _dispatch(self, ch: Channel, msg: Message, peer: PeerCred) -> None:
        method = msg.body.get("method")
        call = Call(ch, msg, str(method), peer)
        iface: Interface | None = None
        result: dict[str, Any] | None
        try:
            if not isinstance(method, str) or "." not in method:
                raise invalid("method")
            if "parameters" in msg.body and not isinstance(msg.body["parameters"], dict):
                raise invalid("parameters")
            if msg.body.get("upgrade") is True:
                raise VarlinkError(f"{SERVICE}.MethodNotImplemented", {"method": method})
            iname, _, mname = method.rpartition(".")
            if iname == SERVICE:
                result = await self._service_method(mname, call)
            else:
                iface = self.interfaces.get(iname)
                if iface is None:
                    raise VarlinkError(f"{SERVICE}.InterfaceNotFound", {"interface": iname})
                handler = iface.methods.get(mname)
                if handler is None:
                    raise VarlinkError(f"{SERVICE}.MethodNotFound", {"method": method})
                if mname in iface.privileged and peer.uid not in (0, self.uid):
                    raise VarlinkError(f"{SERVICE}.PermissionDenied")
                result = await handler(call)
            if not call.replied_final:
                await call.reply(result or {})
        except VarlinkError as e:
            await self._error(call, e)
        except (ConnectionError, BrokenPipeError, ProtocolError):
            raise
        except Exception as e:
            if iface is not None and iface.error_for is not None:
                err = iface.error_for(e)
            else:
                err = VarlinkError(f"{SERVICE}.MethodNotImplemented", {"method": str(method)})
            if not isinstance(e, LaminaError):
                log.exception("method %s failed", method)
            await self._error(call, err)
        finally:
            call.close_fds()

    async def _error(self, call: Call, err: VarlinkError) -> None:
        if call.oneway or call.replied_final:
            return
        await call.channel.send({"error": err.name, "parameters": err.parameters})

    async def _service_method(self, name: str, call: Call) -> dict[str, Any]:
        if name == "GetInfo":
            return {"vendor": self.options.vendor, "product": self.options.product,
                    "version": __version__, "url": self.options.url,
                    "interfaces": [SERVICE, *sorted(self.interfaces)]}
        if name == "GetInterfaceDescription":
            want = call.parameters.get("interface")
            if not isinstance(want, str):
                raise invalid("interface")
            if want == SERVICE:
                return {"description": SERVICE_IDL}
            iface = self.interfaces.get(want)
            if iface is None:
                raise VarlinkError(f"{SERVICE}.InterfaceNotFound", {"interface": want})
            return {"description": iface.description}
        raise VarlinkError(f"{SERVICE}.MethodNotFound", {"method": f"{SERVICE}.{name}"})
