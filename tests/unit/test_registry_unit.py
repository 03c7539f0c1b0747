"""lamina.registry without a registry: references, WWW-Authenticate parsing, auth
files, token scopes, the Bearer/Basic flows against a stub HTTP server on a
loopback port, and the layout sink's partial blobs."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lamina.errors import RegistryError, UsageError
from lamina.oci import mediatypes as mt
from lamina.registry.auth import (
    Credentials,
    lookup_authfile,
    parse_challenges,
    pick_challenge,
    resolve_credentials,
)
from lamina.registry.client import RegistryClient, RegistryOptions, merge_scopes
from lamina.registry.reference import RegistryRef, is_loopback
from lamina.registry.sink import PARTIAL_PREFIX, LayoutSink

DIGEST = "sha256:" + "a" * 64


# -- references ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "registry", "repo", "tag", "digest"), [
    ("127.0.0.1:5000/app:1.0", "127.0.0.1:5000", "app", "1.0", None),
    ("localhost/team/app", "localhost", "team/app", None, None),
    ("docker://quay.io/org/app:v2", "quay.io", "org/app", "v2", None),
    ("debian", "docker.io", "library/debian", None, None),
    ("debian:bookworm", "docker.io", "library/debian", "bookworm", None),
    ("user/app:x", "docker.io", "user/app", "x", None),
    ("index.docker.io/library/busybox", "docker.io", "library/busybox", None, None),
    (f"reg.example:443/a/b/c@{DIGEST}", "reg.example:443", "a/b/c", None, DIGEST),
    (f"reg.example/a:t@{DIGEST}", "reg.example", "a", "t", DIGEST),
    ("[::1]:5000/app:v", "[::1]:5000", "app", "v", None),
    ("r.io/a__b/c-d.e_f:T_1.x-y", "r.io", "a__b/c-d.e_f", "T_1.x-y", None),
])
def test_parse_reference(text: str, registry: str, repo: str, tag: str | None,
                         digest: str | None) -> None:
    ref = RegistryRef.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert ref.reference == (digest or tag or "latest")


def test_reference_hosts() -> None:
    assert RegistryRef.parse("debian").api_host == "registry-1.docker.io"
    assert RegistryRef.parse("127.0.0.1:5000/a").hostname == "127.0.0.1"
    assert RegistryRef.parse("[::1]:5000/a").hostname == "::1"
    assert RegistryRef.parse("localhost/a").hostname == "localhost"
    assert str(RegistryRef.parse(f"r.io/a:t@{DIGEST}")) == f"r.io/a:t@{DIGEST}"


@pytest.mark.parametrize("text", [
    "", "r.io/App:v", "r.io/a:", "r.io/a:-bad", "r.io/a@sha256:short", "r.io/a b",
    "r.io//a", "r.io/a/", "bad_host:5000:1/a", "r.io/a:" + "t" * 200, "r.io/-a",
])
def test_bad_references(text: str) -> None:
    with pytest.raises(UsageError) as e:
        RegistryRef.parse(text)
    assert e.value.hint


def test_loopback() -> None:
    assert is_loopback("localhost") and is_loopback("127.0.0.1") and is_loopback("127.3.2.1")
    assert is_loopback("::1")
    assert not is_loopback("10.0.0.1") and not is_loopback("localhost.example.com")
    assert not is_loopback("example.com")


def test_insecure_only_for_loopback() -> None:
    with pytest.raises(UsageError, match="only allowed for loopback"):
        RegistryClient(RegistryRef.parse("registry.example.com/a"),
                       RegistryOptions(insecure=True, creds=Credentials("u", "p")))
    c = RegistryClient(RegistryRef.parse("registry.example.com/a"),
                       RegistryOptions(insecure=True, force_insecure=True,
                                       creds=Credentials("u", "p")))
    assert c.base == "http://registry.example.com"
    c.close()
    c = RegistryClient(RegistryRef.parse("localhost:5000/a"),
                       RegistryOptions(insecure=True, creds=Credentials("u", "p")))
    assert c.base == "http://localhost:5000"
    c.close()


def test_bad_ca_cert(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(UsageError, match="--ca-cert"):
        RegistryClient(RegistryRef.parse("r.io/a"),
                       RegistryOptions(ca_cert=str(bad), creds=Credentials("u", "p")))


# -- challenges ------------------------------------------------------------------------


def test_parse_bearer_challenge() -> None:
    (c,) = parse_challenges('Bearer realm="https://auth.example/token",'
                            'service="registry.example",scope="repository:a/b:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "registry.example",
                        "scope": "repository:a/b:pull,push"}


def test_parse_several_challenges() -> None:
    cs = parse_challenges('Basic realm="Registry Realm", Bearer realm="https://t/x", '
                          'error="invalid_token"')
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[0].realm == "Registry Realm"
    assert cs[1].params == {"realm": "https://t/x", "error": "invalid_token"}
    assert pick_challenge(cs) is cs[1]


def test_parse_challenge_edge_cases() -> None:
    (c,) = parse_challenges('basic REALM = "quoted \\"name\\", with comma"')
    assert c.scheme == "basic" and c.params == {"realm": 'quoted "name", with comma'}
    (c,) = parse_challenges("Negotiate abc123==")
    assert c.params == {"": "abc123=="}
    cs = parse_challenges("Basic, Bearer realm=https://t/x")
    assert [c.scheme for c in cs] == ["basic", "bearer"] and cs[1].realm == "https://t/x"
    assert parse_challenges("") == []
    assert pick_challenge(parse_challenges("Digest realm=x")) is None


# -- auth files ------------------------------------------------------------------------


def _auth(user: str, pw: str) -> str:
    return base64.b64encode(f"{user}:{pw}".encode()).decode()


def test_authfile_lookup(tmp_path: Path) -> None:
    f = tmp_path / "auth.json"
    f.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": _auth("hub", "h:p")},
        "r.io": {"auth": _auth("any", "1")},
        "r.io/team": {"auth": _auth("team", "2")},
        "r.io/team/special": {"username": "special", "password": "3"},
        "tok.io": {"identitytoken": "refresh"},
    }}))
    assert lookup_authfile(str(f), "docker.io", "library/debian") == Credentials("hub", "h:p")
    assert lookup_authfile(str(f), "r.io", "other/app") == Credentials("any", "1")
    assert lookup_authfile(str(f), "r.io", "team/app") == Credentials("team", "2")
    assert lookup_authfile(str(f), "r.io", "team/special") == Credentials("special", "3")
    assert lookup_authfile(str(f), "r.io", "team/specialist") == Credentials("team", "2")
    tok = lookup_authfile(str(f), "tok.io", "a")
    assert tok is not None and tok.identity_token == "refresh"
    assert lookup_authfile(str(f), "elsewhere.io", "a") is None
    assert lookup_authfile(str(tmp_path / "missing.json"), "r.io", "a") is None
    with pytest.raises(UsageError, match="does not exist"):
        lookup_authfile(str(tmp_path / "missing.json"), "r.io", "a", required=True)


def test_authfile_errors(tmp_path: Path) -> None:
    f = tmp_path / "auth.json"
    f.write_text("{not json")
    with pytest.raises(UsageError) as e:
        lookup_authfile(str(f), "r.io", "a")
    assert e.value.hint and "auths" in e.value.hint
    f.write_text(json.dumps({"auths": {"r.io": {"auth": "%%%"}}}))
    with pytest.raises(UsageError, match="base64"):
        lookup_authfile(str(f), "r.io", "a")


def test_credential_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(
        json.dumps({"auths": {"r.io": {"auth": _auth("docker", "d")}}}))
    for var in ("LAMINA_CREDS", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
                "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    assert resolve_credentials("r.io", "a") == Credentials("docker", "d")
    assert resolve_credentials("other.io", "a") is None
    af = tmp_path / "af.json"
    af.write_text(json.dumps({"auths": {"r.io": {"auth": _auth("file", "f")}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(af))
    assert resolve_credentials("r.io", "a") == Credentials("file", "f")
    assert resolve_credentials("other.io", "a") is None  # an explicit file is the only one
    monkeypatch.setenv("LAMINA_CREDS", "env:e:x")
    assert resolve_credentials("r.io", "a") == Credentials("env", "e:x")
    assert resolve_credentials("r.io", "a", creds=Credentials("cli", "c")) == \
        Credentials("cli", "c")
    with pytest.raises(UsageError):
        Credentials.parse("nocolon")
    assert "c" not in repr(Credentials("cli", "c")).replace("cli", "")


def test_merge_scopes() -> None:
    assert merge_scopes(["repository:a:pull,push", "repository:a:pull", "",
                         "repository:b:pull", "registry:catalog:*", "odd"]) == \
        ["repository:a:pull,push", "repository:b:pull", "registry:catalog:*", "odd"]
    assert merge_scopes(["repository:a:pull", "repository:a:push"]) == \
        ["repository:a:pull,push"]
    # a port in the name (a registry-qualified resource) keeps its colons
    assert merge_scopes(["repository:h:5000/a:pull"]) == ["repository:h:5000/a:pull"]


# -- auth flows against a stub server ------------------------------------------------------

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": mt.MANIFEST,
                       "config": {"mediaType": mt.CONFIG, "digest": DIGEST, "size": 2},
                       "layers": []}).encode()


class Stub:
    """A registry answering one manifest, behind Basic or Bearer auth."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.log: list[tuple[str, str, str]] = []  # (path, Authorization, query)
        stub = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                auth = self.headers.get("Authorization", "")
                stub.log.append((path, auth, query))
                if path == "/token":
                    if auth != Credentials("u", "p").basic_header():
                        self._send(401, b"", {})
                        return
                    self._send(200, json.dumps({"access_token": "TOKEN1"}).encode(),
                               {"Content-Type": "application/json"})
                    return
                want = "Bearer TOKEN1" if stub.scheme == "bearer" else \
                    Credentials("u", "p").basic_header()
                if auth != want:
                    ch = (f'Bearer realm="http://127.0.0.1:{stub.port}/token",'
                          f'service="stub",scope="repository:a/b:pull"'
                          if stub.scheme == "bearer" else 'Basic realm="stub"')
                    self._send(401, json.dumps({"errors": [{"code": "UNAUTHORIZED",
                                                            "message": "no"}]}).encode(),
                               {"WWW-Authenticate": ch})
                    return
                self._send(200, MANIFEST, {"Content-Type": mt.MANIFEST})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def client(self, creds: Credentials | None) -> RegistryClient:
        return RegistryClient(RegistryRef.parse(f"127.0.0.1:{self.port}/a/b"),
                              RegistryOptions(insecure=True, creds=creds,
                                              authfile=None),
                              ["repository:a/b:pull,push", "repository:c:pull"])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(params=["bearer", "basic"])
def stub(request: pytest.FixtureRequest) -> Iterator[Stub]:
    s = Stub(request.param)
    yield s
    s.close()


def test_auth_flow(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    with stub.client(Credentials("u", "p")) as c:
        fm = c.get_manifest("a/b", "v1")
        assert fm.digest == "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
        c.get_manifest("a/b", "v2")
    paths = [p for p, _, _ in stub.log]
    if stub.scheme == "bearer":
        # one token for both requests, asked with the credentials and every scope once
        assert paths == ["/v2/a/b/manifests/v1", "/token", "/v2/a/b/manifests/v1",
                         "/v2/a/b/manifests/v2"]
        query = stub.log[1][2]
        assert "service=stub" in query
        assert query.count("scope=") == 2 and "repository%3Aa%2Fb%3Apull%2Cpush" in query
    else:
        assert paths == ["/v2/a/b/manifests/v1", "/v2/a/b/manifests/v1",
                         "/v2/a/b/manifests/v2"]


def test_auth_flow_without_credentials(stub: Stub, monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    for var in ("LAMINA_CREDS", "REGISTRY_AUTH_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with stub.client(None) as c, pytest.raises(RegistryError) as e:
        c.get_manifest("a/b", "v1")
    assert e.value.hint and "--creds" in e.value.hint
    if stub.scheme == "basic":
        assert "UNAUTHORIZED" in e.value.message  # the registry's own error code is shown


def test_auth_flow_wrong_password(stub: Stub) -> None:
    with stub.client(Credentials("u", "wrong")) as c, pytest.raises(RegistryError) as e:
        c.get_manifest("a/b", "v1")
    assert e.value.hint and "password" in e.value.hint


# -- layout sink ----------------------------------------------------------------------


def test_layout_sink_partials(tmp_path: Path) -> None:
    sink = LayoutSink.init(str(tmp_path / "lay"))
    data = b"0123456789" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    p = sink.open_partial(digest)
    assert p.offset == 0
    p.write(data[:4000])
    # a second writer of the same blob meanwhile gets a private file, not the partial
    q = sink.open_partial(digest)
    assert q.offset == 0
    q.write(b"junk")
    q.close()
    p.close()
    assert sink.partials() == [PARTIAL_PREFIX + digest[7:]]
    assert not sink.has_blob(digest)
    p = sink.open_partial(digest)
    assert p.offset == 4000 and b"".join(p.read_back()) == data[:4000]
    p.write(data[4000:])
    p.commit()
    p.close()
    assert sink.has_blob(digest) and sink.partials() == []
    assert (tmp_path / "lay/blobs/sha256" / digest[7:]).read_bytes() == data
    # a truncated partial is removed on close: nothing to resume
    other = "sha256:" + "b" * 64
    p = sink.open_partial(other)
    p.write(b"abc")
    p.truncate()
    p.close()
    assert sink.partials() == []
    assert sorted(x.name for x in (tmp_path / "lay/blobs/sha256").iterdir()) == [digest[7:]]
