"""``lamina serve`` as a real process: the reference varlink client, fd passing, hostile peers."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import varlink

from lamina.errors import DigestMismatchError, NotFoundError
from lamina.ipc.client import StoreBusyError, StoreClient, SyncStoreClient
from lamina.ipc.protocol import VarlinkError
from lamina.oci.layout import OCILayout
from lamina.stream.splitdirfdstream import StreamWriter
from lamina.testing.images import build_image, diff_id
from lamina.testing.layers import TarBuilder

LAMINA = [sys.executable, "-m", "lamina"]


def _layers() -> list[bytes]:
    a = TarBuilder()
    a.add_dir("etc")
    a.add_file("etc/hostname", b"box\n")
    a.add_file("bin/big", os.urandom(1 << 20), mode=0o755)
    a.add_symlink("bin/sh", "big")
    b = TarBuilder("gnu")
    b.add_file("usr/share/" + "x" * 120 + "/doc", b"long name" * 100)
    b.add_whiteout("etc/hostname")
    return [a.build(), b.build()]


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], sock: str, layout: str) -> None:
        self.proc = proc
        self.sock = sock
        self.layout = layout

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def _start(tmp: Path, name: str, layout: str) -> Server:
    sock = str(tmp / f"{name}.sock")
    proc = subprocess.Popen([*LAMINA, "serve", "--socket", sock, "--layout", layout],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"lamina serve did not start: {proc.communicate()[1]!r}")
        time.sleep(0.05)
    return Server(proc, sock, layout)


def _stop(s: Server) -> None:
    s.proc.terminate()
    try:
        _, err = s.proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        s.proc.communicate()
        raise
    assert s.proc.returncode == 0, err
    assert not os.path.exists(s.sock)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[bytes]]:
    layout = str(tmp_path_factory.mktemp("src") / "layout")
    layers = _layers()
    build_image(layout, "app", layers, config={"Cmd": ["/bin/sh"]})
    return layout, layers


@pytest.fixture(scope="module")
def server(image: tuple[str, list[bytes]],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = _start(tmp_path_factory.mktemp("sock"), "src", image[0])
    try:
        yield s
    finally:
        _stop(s)


@pytest.fixture
def empty_server(tmp_path: Path) -> Iterator[Server]:
    layout = str(tmp_path / "dst")
    OCILayout.init(layout)
    s = _start(tmp_path, "dst", layout)
    try:
        yield s
    finally:
        _stop(s)


def test_socket_is_private(server: Server) -> None:
    st = os.stat(server.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


# -- the reference client ------------------------------------------------------------------------

def test_reference_client_getinfo_introspection_and_call(server: Server) -> None:
    with varlink.Client(address=f"unix:{server.sock}") as client:
        iface = client.get_interface("io.lamina.Store")   # parses our IDL
        assert "GetLayer" in iface.members and "PutLayer" in iface.members
        with client.open("org.varlink.service") as svc:
            info = svc.GetInfo()
            assert "io.lamina.Store" in info["interfaces"]
            desc = svc.GetInterfaceDescription("io.lamina.Store")["description"]
            assert desc.startswith("# A lamina image store")
        with client.open("io.lamina.Store") as store:
            images = store.ListImages()["images"]
            assert [i["tag"] for i in images] == ["app"]
            with pytest.raises(varlink.VarlinkError) as ei:
                store.Inspect("nope")
            assert ei.value.error() == "io.lamina.Store.NotFound"
            assert ei.value.parameters()["code"] == 3


# -- the lamina client with descriptors ----------------------------------------------------------

def test_fetch_layers_verify_diff_ids(server: Server, image: tuple[str, list[bytes]]) -> None:
    with SyncStoreClient(server.sock) as c:
        info = c.inspect("app")
        ids = [rec["diff_id"] for rec in info["layers"]]
        assert ids == [diff_id(t) for t in image[1]]
        for want, tar in zip(ids, image[1], strict=True):
            out = io.BytesIO()
            assert c.fetch_layer(want, out) == want
            assert out.getvalue() == tar
        with pytest.raises(NotFoundError):
            c.fetch_layer("sha256:" + "0" * 64, io.BytesIO())


def test_copy_between_layouts_forwards_fds(server: Server, empty_server: Server,
                                           image: tuple[str, list[bytes]]) -> None:
    async def copy() -> None:
        async with await StoreClient.connect(server.sock) as src, \
                await StoreClient.connect(empty_server.sock) as dst:
            info = await src.inspect("app")
            recs = []
            for layer in info["layers"]:
                assert not await dst.has_layer(layer["diff_id"])
                recs.append(await src.copy_layer_to(dst, layer["diff_id"], compression="zstd"))
            config = {k: v for k, v in info["config"].items() if k != "rootfs"}
            await dst.finalize_image("copied", config, recs)

    asyncio.run(copy())
    lay = OCILayout.open(empty_server.layout)
    m = lay.resolve("copied")
    cfg = lay.config_for(m)
    assert list(cfg.diff_ids) == [diff_id(t) for t in image[1]]
    assert cfg.config["Cmd"] == ["/bin/sh"]
    assert all(d.media_type.endswith("+zstd") for d in m.layers)


def test_put_with_wrong_diff_id_leaves_nothing(empty_server: Server) -> None:
    blobs = Path(empty_server.layout, "blobs", "sha256")
    before = sorted(os.listdir(blobs))
    with SyncStoreClient(empty_server.sock) as c:
        with pytest.raises(DigestMismatchError):
            c.put_tar(io.BytesIO(_layers()[0]), diff_id="sha256:" + "1" * 64)
        rec = c.put_tar(io.BytesIO(_layers()[0]), compression="none")
        assert rec.diff_id == rec.descriptor.digest   # uncompressed: blob == tar
    assert sorted(os.listdir(blobs)) == sorted([*before, rec.descriptor.digest[7:]])


def test_hold_blocks_gc_until_the_lifetime_pipe_closes(empty_server: Server) -> None:
    with SyncStoreClient(empty_server.sock) as c:
        lease = c.hold()
        with pytest.raises(StoreBusyError):
            c.gc()
        os.close(lease)
        for _ in range(100):
            try:
                res = c.gc(dry_run=True)
                break
            except StoreBusyError:
                time.sleep(0.05)
        else:
            pytest.fail("the hold was not released after its pipe closed")
        assert res["dry_run"] is True


def test_fifty_concurrent_clients(server: Server, image: tuple[str, list[bytes]]) -> None:
    ids = [diff_id(t) for t in image[1]]
    tars = dict(zip(ids, image[1], strict=True))

    async def one(i: int) -> int:
        async with await StoreClient.connect(server.sock) as c:
            want = ids[i % len(ids)]
            out = io.BytesIO()
            assert await c.fetch_layer(want, out) == want
            assert out.getvalue() == tars[want]
            return 1

    async def all_of_them() -> int:
        return sum(await asyncio.gather(*(one(i) for i in range(50))))

    before = server.fds()
    assert asyncio.run(all_of_them()) == 50
    _settle_fds(server, before)


# -- hostile peers -------------------------------------------------------------------------------

def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def _recv_msg(s: socket.socket) -> dict[str, object] | None:
    buf = b""
    while not buf.endswith(b"\0"):
        try:
            b = s.recv(65536)
        except ConnectionResetError:    # the server closed with our data unread
            return None
        if not b:
            return None
        buf += b
    out: dict[str, object] = json.loads(buf[:-1])
    return out


def _send(s: socket.socket, body: object, fds: list[int] | None = None) -> None:
    data = json.dumps(body).encode() + b"\0"
    if fds:
        socket.send_fds(s, [data], fds)
    else:
        s.sendall(data)


def _settle_fds(server: Server, before: int) -> None:
    for _ in range(100):    # stream threads close their pipes just after the last reply
        if server.fds() <= before:
            return
        time.sleep(0.05)
    assert server.fds() <= before, os.listdir(f"/proc/{server.proc.pid}/fd")


def _still_answers(server: Server) -> None:
    with _raw(server.sock) as s:
        _send(s, {"method": "org.varlink.service.GetInfo"})
        reply = _recv_msg(s)
        assert reply is not None and "interfaces" in reply["parameters"]  # type: ignore[operator]


def test_hostile_clients_do_not_hurt_or_leak(server: Server, tmp_path: Path) -> None:
    _still_answers(server)
    before = server.fds()

    # oversized message: the server drops the connection without answering
    with _raw(server.sock) as s:
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(9):
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _recv_msg(s) is None

    # bad JSON and a non-object, with descriptors attached: dropped, fds closed
    for payload in (b"{not json", b"[1,2]"):
        with _raw(server.sock) as s:
            r, w = os.pipe()
            socket.send_fds(s, [payload + b"\0"], [r, w])
            os.close(r)
            os.close(w)
            assert _recv_msg(s) is None

    with _raw(server.sock) as s:
        # unknown method and interface: a standard error, and the connection goes on
        _send(s, {"method": "io.lamina.Store.Explode"})
        assert _recv_msg(s) == {"error": "org.varlink.service.MethodNotFound",
                                "parameters": {"method": "io.lamina.Store.Explode"}}
        _send(s, {"method": "com.example.Nope.Call"})
        reply = _recv_msg(s)
        assert reply is not None and reply["error"] == "org.varlink.service.InterfaceNotFound"
        # extra fds on a call that takes none: answered, fds closed
        r, w = os.pipe()
        _send(s, {"method": "io.lamina.Store.ListImages"}, [r, w, r])
        os.close(r)
        os.close(w)
        reply = _recv_msg(s)
        assert reply is not None and "images" in reply["parameters"]  # type: ignore[operator]
        # wrong fds: the stream index points past the descriptors sent
        r, w = os.pipe()
        _send(s, {"method": "io.lamina.Store.PutLayer",
                  "parameters": {"stream": 3, "dirfds": []}}, [r])
        os.close(r)
        os.close(w)
        reply = _recv_msg(s)
        assert reply == {"error": "org.varlink.service.InvalidParameter",
                         "parameters": {"parameter": "stream"}}
        # a directory where a pipe is expected
        dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        _send(s, {"method": "io.lamina.Store.PutLayer",
                  "parameters": {"stream": 0, "dirfds": []}}, [dfd])
        os.close(dfd)
        reply = _recv_msg(s)
        assert reply is not None and reply["error"] == "io.lamina.Store.CorruptLayer"
        # a stream that references a file in a directory that was not passed
        r, w = os.pipe()
        with os.fdopen(w, "wb") as f, StreamWriter(f) as sw:
            sw.metadata(b"\0" * 512)
            sw.file_ref(3, 0, "ab/cd")
        _send(s, {"method": "io.lamina.Store.PutLayer",
                  "parameters": {"stream": 0, "dirfds": []}}, [r])
        os.close(r)
        reply = _recv_msg(s)
        assert reply is not None and reply["error"] == "io.lamina.Store.CorruptLayer"

    # disconnect in the middle of a PutLayer stream
    with _raw(server.sock) as s:
        r, w = os.pipe()
        _send(s, {"method": "io.lamina.Store.PutLayer",
                  "parameters": {"stream": 0, "dirfds": []}}, [r])
        os.close(r)
        os.write(w, b"\0\x00\x02\x00\x00" + b"x" * 100)   # a metadata chunk cut short
    os.close(w)

    # disconnect in the middle of a GetLayer stream (never read the pipe)
    with _raw(server.sock) as s:
        _send(s, {"method": "io.lamina.Store.GetLayer",
                  "parameters": {"diff_id": diff_id(_layers()[1])}})
        msg, fds, _, _ = socket.recv_fds(s, 65536, 10)
        # layer b is deterministic: present; the stream and the compressed blob
        assert b'"stream":0' in msg and b'"blob":1' in msg and len(fds) == 2
        for fd in fds:
            os.close(fd)

    # disconnect mid-message
    with _raw(server.sock) as s:
        s.sendall(b'{"method": "org.varlink.service.Get')

    _still_answers(server)
    _settle_fds(server, before)
    assert server.proc.poll() is None


def test_other_users_are_refused(server: Server) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 to run as another user")
    # the socket's directory is private: reach the socket through an O_PATH fd instead
    os.chmod(server.sock, 0o666)    # let connect() through; SO_PEERCRED must refuse
    fd = os.open(server.sock, os.O_PATH)
    try:
        code = ("import socket,sys; s=socket.socket(socket.AF_UNIX);"
                "s.connect('/proc/self/fd/'+sys.argv[1]);"
                "d=b''\n"
                "try:\n s.sendall(b'{\"method\":\"org.varlink.service.GetInfo\"}\\0');"
                "d=s.recv(100)\nexcept OSError: pass\nprint(repr(d))")
        out = subprocess.run([python, "-c", code, str(fd)], user=65534, group=65534,
                             extra_groups=[], pass_fds=[fd], capture_output=True, text=True,
                             timeout=30, check=True)
        assert out.stdout.strip() == "b''"
    finally:
        os.close(fd)
        os.chmod(server.sock, 0o600)
    _still_answers(server)


def test_errors_are_varlink_errors_in_process(server: Server) -> None:
    async def go() -> None:
        async with await StoreClient.connect(server.sock) as c:
            with pytest.raises(VarlinkError) as ei:
                await c.call("io.lamina.Store.HasLayer", {"diff_id": 7})
            assert ei.value.name == "org.varlink.service.InvalidParameter"

    asyncio.run(go())
