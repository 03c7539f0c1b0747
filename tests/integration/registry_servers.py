"""Real servers for the registry tests, all on loopback ports of this machine.

- :class:`Registry`: Debian's ``docker-registry`` (the distribution project's
  reference registry) with a temporary config and storage; optionally TLS, an
  htpasswd file (basic auth) or token auth.
- :class:`TokenServer`: a token endpoint issuing RS256 JWTs the registry
  trusts (its certificate is the registry's ``rootcertbundle``), checking
  basic credentials first.
- :class:`FaultProxy`: an HTTP proxy in front of a registry that can answer a
  chosen status, corrupt a blob, or cut a download midway and stop the
  registry, so failures are injected into real traffic.
- :class:`ReferrersFront`: a front adding the OCI 1.1 referrers API to a registry
  that lacks it (distribution 2.8), so the client's native referrers path is
  exercised against real storage.
- :func:`make_tls`: a CA and a server certificate for 127.0.0.1/localhost.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.client
import http.server
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

INDEX = "application/vnd.oci.image.index.v1+json"

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- TLS ---------------------------------------------------------------------------------


@dataclass
class TLSFiles:
    ca_cert: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def self_signed(key: rsa.RSAPrivateKey, cn: str, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(hours=1))
         .not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    return b.sign(key, hashes.SHA256())


def make_tls(d: Path) -> TLSFiles:
    """A CA and a server certificate it signs for 127.0.0.1, ::1 and localhost."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = self_signed(ca_key, "lamina test CA", ca=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TLSFiles(d / "ca.pem", d / "server.pem", d / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.TraditionalOpenSSL,
                                            serialization.NoEncryption()))
    return files


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}"
             for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the registry ------------------------------------------------------------------------


class Registry:
    """``docker-registry serve`` on 127.0.0.1:PORT; ``stop()``/``start()`` keep port and
    storage, as a restarted registry would."""

    def __init__(self, workdir: Path, *, tls: TLSFiles | None = None,
                 htpasswd: Path | None = None, token: dict[str, str] | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.dir / "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": uuid.uuid4().hex},
        }
        if tls:
            cfg["http"]["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
        if htpasswd:
            cfg["auth"] = {"htpasswd": {"realm": "lamina-test", "path": str(htpasswd)}}
        if token:
            cfg["auth"] = {"token": token}
        # YAML is a superset of JSON
        self.config = self.dir / "config.yml"
        self.config.write_text(json.dumps(cfg, indent=1))
        self.log = self.dir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config)],
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


# -- token server ------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry tokens for the requested scopes to one user (basic auth)."""

    issuer = "lamina-test-issuer"
    service = "lamina-test-registry"

    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert = self_signed(self.key, "lamina token signer", ca=True)
        self.cert_file = workdir / "token-signer.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.users = users
        self.requests: list[dict[str, Any]] = []
        self.lifetime = 300     # seconds; the registry allows 60 more (clock skew leeway)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                from urllib.parse import parse_qs, urlsplit
                q = parse_qs(urlsplit(self.path).query)
                auth = self.headers.get("Authorization", "")
                user = None
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if server.users.get(u) == p:
                        user = u
                server.requests.append({"user": user, "scope": q.get("scope", []),
                                        "service": q.get("service", [])})
                if user is None:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"token": server.issue(user, q.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_config(self) -> dict[str, str]:
        return {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                "rootcertbundle": str(self.cert_file)}

    def issue(self, user: str, scopes: list[str]) -> str:
        access = []
        for s in scopes:
            typ, name, actions = s.split(":") if s.count(":") == 2 else ("", "", "")
            if typ:
                access.append({"type": typ, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(
                      serialization.Encoding.DER)).decode()]}
        claims = {"iss": self.issuer, "sub": user, "aud": self.service,
                  "exp": now + self.lifetime,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing = (_b64url(json.dumps(header).encode()) + "." +
                   _b64url(json.dumps(claims).encode()))
        sig = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing + "." + _b64url(sig)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- fault-injecting proxy -----------------------------------------------------------------

#: (method, path) -> None to forward, or a Fault
FaultRule = Callable[[str, str], "Fault | None"]


@dataclass
class Fault:
    status: int | None = None           # answer this status with a registry-style error
    headers: dict[str, str] | None = None
    corrupt: bool = False               # forward, with one body byte flipped
    cut_after: int | None = None        # forward this many body bytes, then drop everything
    on_cut: Callable[[], None] | None = None
    throttle: float = 0.0               # seconds to sleep after each 64 KiB of body



class _Quiet(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 handler that logs nothing and hands GET and HEAD to ``_handle``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_GET(self) -> None:
        self._handle("GET")

    def _handle(self, method: str) -> None:
        raise NotImplementedError


def _serve(handler: type[_Quiet]) -> tuple[http.server.ThreadingHTTPServer, int]:
    """*handler* on a loopback port, served by a daemon thread."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, httpd.server_address[1]


class FaultProxy:
    """Forwards GET/HEAD to a plain-http registry, applying :class:`Fault` rules."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rule: FaultRule = lambda method, path: None
        self.hits: list[tuple[str, str, str]] = []   # (method, path, what was done)
        # every request forwarded whole: (method, path, Range header, body bytes sent)
        self.served: list[tuple[str, str, str, int]] = []
        proxy = self

        class Handler(_Quiet):
            def _handle(self, method: str) -> None:
                fault = proxy.rule(method, self.path)
                if fault is not None and fault.status is not None:
                    proxy.hits.append((method, self.path, f"status {fault.status}"))
                    body = json.dumps({"errors": [{"code": "INJECTED",
                                                   "message": "injected failure"}]}).encode()
                    self.send_response(fault.status)
                    for k, v in (fault.headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(body)
                    return
                host, port = proxy.upstream.rsplit(":", 1)
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                try:
                    conn.request(method, self.path, headers=headers)
                    resp = conn.getresponse()
                except OSError:
                    proxy.hits.append((method, self.path, "upstream down"))
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.end_headers()
                sent = 0
                flipped = False
                while method != "HEAD":
                    chunk = resp.read(65536)
                    if not chunk:
                        break
                    if fault is not None and fault.cut_after is not None \
                            and sent + len(chunk) >= fault.cut_after:
                        self.wfile.write(chunk[:fault.cut_after - sent])
                        self.wfile.flush()
                        proxy.hits.append((method, self.path, f"cut at {fault.cut_after}"))
                        if fault.on_cut:
                            fault.on_cut()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        conn.close()
                        return
                    if fault is not None and fault.corrupt and not flipped:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                        flipped = True
                    try:
                        self.wfile.write(chunk)
                    except OSError:  # the client went away
                        self.close_connection = True
                        conn.close()
                        return
                    sent += len(chunk)
                    if fault is not None and fault.throttle:
                        time.sleep(fault.throttle)
                if fault is not None and fault.corrupt:
                    proxy.hits.append((method, self.path, "corrupted"))
                proxy.served.append((method, self.path, self.headers.get("Range", ""), sent))
                conn.close()

        self.httpd, self.port = _serve(Handler)
        self._closed = False

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop listening: later connections are refused."""
        if not self._closed:
            self._closed = True
            self.httpd.shutdown()
            self.httpd.server_close()

    def close_soon(self) -> None:
        """close() from a handler thread (shutdown() would wait for that handler)."""
        threading.Thread(target=self.close, daemon=True).start()


class ReferrersFront:
    """A front for a plain-http registry that adds the OCI 1.1 referrers API, which
    distribution 2.8 lacks: a manifest PUT with a ``subject`` is answered with the
    ``OCI-Subject`` header and listed, and ``GET /v2/NAME/referrers/DIGEST`` (with an
    optional ``artifactType`` filter) answers an image index of them.  Everything
    else is forwarded as it is, the Host header included (so upload locations point
    back here)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.referrers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str, int]] = []      # (method, path, status)
        front = self

        class Handler(_Quiet):
            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

            def _reply(self, method: str, status: int, headers: list[tuple[str, str]],
                       body: bytes) -> None:
                front.requests.append((method, self.path, status))
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                length = dict((k.lower(), v) for k, v in headers).get("content-length")
                # a HEAD answers the length of what a GET would send
                self.send_header("Content-Length", length if method == "HEAD" and length
                                 else str(len(body)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)

            def _handle(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                url = urllib.parse.urlsplit(self.path)
                m = re.fullmatch(r"/v2/(.+)/referrers/(sha256:[0-9a-f]{64})", url.path)
                if m and method == "GET":
                    want = urllib.parse.parse_qs(url.query).get("artifactType")
                    listed = [d for d in front.referrers.get((m[1], m[2]), [])
                              if not want or d["artifactType"] in want]
                    doc = {"schemaVersion": 2, "mediaType": INDEX, "manifests": listed}
                    hdrs = [("Content-Type", INDEX)]
                    if want:
                        hdrs.append(("OCI-Filters-Applied", "artifactType"))
                    self._reply(method, 200, hdrs, json.dumps(doc).encode())
                    return
                host, port = front.upstream.rsplit(":", 1)
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                try:
                    conn.request(method, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                out = list(resp.getheaders())
                mm = re.fullmatch(r"/v2/(.+)/manifests/[^/]+", url.path)
                if method == "PUT" and mm and resp.status == 201:
                    doc = json.loads(body)
                    subject = doc.get("subject")
                    if isinstance(subject, dict):
                        front.referrers.setdefault((mm[1], subject["digest"]), []).append({
                            "mediaType": doc.get("mediaType") or self.headers["Content-Type"],
                            "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                            "size": len(body),
                            "artifactType": doc.get("artifactType")
                            or doc["config"]["mediaType"]})
                        out.append(("OCI-Subject", subject["digest"]))
                self._reply(method, resp.status, out, data)

        self.httpd, self.port = _serve(Handler)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def auth_json(path: Path, registry: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": token}}}))
    os.chmod(path, 0o600)
    return path
