"""A client for the OCI distribution API (``/v2/``) on httpx.

One :class:`RegistryClient` talks to one registry for one or more
repositories, from any number of threads (httpx's connection pool is
thread-safe; the token is refreshed under a lock).  It authenticates lazily:
the first ``401`` names the scheme (see :mod:`lamina.registry.auth`), the
request is sent again with credentials or a token covering every scope the
client was made for, and that header is reused for later requests.

Every failure becomes a :class:`~lamina.errors.LaminaError` with a hint:
transport problems (refused, TLS, timeout, dropped connection) and error
answers (401/403 -> :class:`RegistryError`, 404 -> :class:`NotFoundError`,
5xx -> :class:`RegistryError`), with the registry's own error codes from the
JSON body in the message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from lamina import __version__
from lamina.errors import (
    DigestMismatchError,
    ImageFormatError,
    LaminaError,
    NotFoundError,
    RegistryError,
    UsageError,
)
from lamina.oci import mediatypes as mt
from lamina.registry.auth import (
    Credentials,
    parse_challenges,
    pick_challenge,
    resolve_credentials,
)
from lamina.registry.reference import RegistryRef, is_loopback
from lamina.registry.transport import StdlibTransport

MAX_MANIFEST = 4 << 20  # the distribution spec lets registries refuse larger manifests
MANIFEST_ACCEPT = ", ".join([mt.INDEX, mt.MANIFEST, mt.DOCKER_MANIFEST_LIST,
                             mt.DOCKER_MANIFEST])
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
CREDS_HINT = "pass --creds USER:PASSWORD, --authfile FILE, or set LAMINA_CREDS"


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach and authenticate to a registry (shared by pull and push)."""

    insecure: bool = False          # plain http (loopback hosts only unless forced)
    force_insecure: bool = False    # allow plain http to any host
    ca_cert: str | None = None      # PEM file of extra CA certificates to trust
    creds: Credentials | None = None
    authfile: str | None = None
    timeout: float = 60.0           # seconds without progress on one request
    retries: int = 2                # resumes of a blob download after a dropped connection
    connections: int = 8            # connection pool size


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: str
    doc: dict[str, Any] = field(repr=False)


class _LazyTrust(ssl.SSLContext):
    """Loads the default CA bundle (httpx's: SSL_CERT_FILE/SSL_CERT_DIR, else certifi)
    at the first TLS handshake: that takes a tenth of a second, which a pull from a
    plain-http registry need not pay."""

    _loaded = False
    _load_lock = threading.Lock()

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if not self._loaded:
            with self._load_lock:
                if not self._loaded:
                    if os.environ.get("SSL_CERT_FILE"):
                        self.load_verify_locations(cafile=os.environ["SSL_CERT_FILE"])
                    elif os.environ.get("SSL_CERT_DIR"):
                        self.load_verify_locations(capath=os.environ["SSL_CERT_DIR"])
                    else:
                        import certifi
                        self.load_verify_locations(cafile=certifi.where())
                    self._loaded = True
        return super().wrap_socket(*args, **kwargs)


class RegistryClient:
    """The distribution API of one registry, for the repositories in *scopes*."""

    def __init__(self, ref: RegistryRef, options: RegistryOptions,
                 scopes: Iterable[str] = ()) -> None:
        self.ref = ref
        self.options = options
        host = ref.api_host
        if options.insecure or options.force_insecure:
            if not (options.force_insecure or is_loopback(ref.hostname)):
                raise UsageError(
                    f"--insecure (plain http) is only allowed for loopback registries, "
                    f"not {ref.registry}",
                    hint="use TLS (with --ca-cert FILE for a private CA), or "
                         "--force-insecure if you really mean to send images and "
                         "credentials unencrypted")
            self.base = f"http://{host}"
        else:
            self.base = f"https://{host}"
        verify = _LazyTrust(ssl.PROTOCOL_TLS_CLIENT)
        verify.minimum_version = ssl.TLSVersion.TLSv1_2
        if options.ca_cert:
            try:
                verify.load_verify_locations(cafile=options.ca_cert)
            except (OSError, ssl.SSLError) as e:
                raise UsageError(f"--ca-cert {options.ca_cert}: {e}",
                                 hint="give a PEM file with the CA certificate(s)") from None
        # http.client underneath (see transport.py); hosts behind an env proxy
        # (HTTPS_PROXY...) go through httpx's own transport, which uses *verify*
        self.http = httpx.Client(
            transport=StdlibTransport(verify, options.connections),
            verify=verify, follow_redirects=True,
            timeout=httpx.Timeout(options.timeout, connect=min(options.timeout, 15.0)),
            limits=httpx.Limits(max_connections=options.connections,
                                max_keepalive_connections=options.connections),
            headers={"User-Agent": f"lamina/{__version__}"})
        self.scopes: list[str] = list(scopes)
        self._creds = resolve_credentials(ref.registry, ref.repository, creds=options.creds,
                                          authfile=options.authfile)
        self._auth: str | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------
    def url(self, repo: str, kind: str, ref: str = "") -> str:
        return f"{self.base}/v2/{repo}/{kind}/{ref}"

    def request(self, method: str, url: str, *, what: str,
                headers: dict[str, str] | None = None,
                content: Callable[[], bytes | Iterator[bytes]] | None = None,
                stream: bool = False) -> httpx.Response:
        """Send a request, answering one authentication challenge; transport errors
        become :class:`RegistryError`.  *content* is a factory so that the body can
        be sent again after a ``401``."""
        for attempt in range(2):
            hdrs = dict(headers or {})
            used = self._auth
            if used:
                hdrs["Authorization"] = used
            try:
                req = self.http.build_request(method, url, headers=hdrs,
                                              content=content() if content else None)
                resp = self.http.send(req, stream=stream)
            except httpx.HTTPError as e:
                raise transport_error(e, self.ref.registry, what) from None
            if resp.status_code == 401 and attempt == 0:
                challenge = resp.headers.get("WWW-Authenticate", "")
                with contextlib.suppress(httpx.HTTPError):
                    resp.read()  # small error body, kept for the message
                resp.close()
                if self._authenticate(challenge, used, what):
                    continue
                return resp
            return resp
        raise AssertionError("unreachable")

    def _authenticate(self, header: str, used: str | None, what: str) -> bool:
        """Set a new Authorization header from a challenge; False if none can help."""
        with self._lock:
            if self._auth != used:  # another thread already answered a challenge
                return True
            ch = pick_challenge(parse_challenges(header))
            if ch is None:
                return False
            if ch.scheme == "basic":
                if self._creds is None or self._creds.identity_token:
                    return False
                new = self._creds.basic_header()
            else:
                new = "Bearer " + self._fetch_token(ch.params, what)
            if new == used:
                return False
            self._auth = new
            return True

    def _fetch_token(self, params: dict[str, str], what: str) -> str:
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"{what}: the registry's Bearer challenge has no realm",
                                hint="the registry's token auth is misconfigured")
        scopes = merge_scopes([*self.scopes, *params.get("scope", "").split(" ")])
        query: list[tuple[str, str | int | float | bool | None]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query += [("scope", s) for s in scopes]
        headers: dict[str, str] = {}
        creds = self._creds
        try:
            if creds is not None and creds.identity_token:
                # docker's OAuth2 refresh token: POST form to the realm
                form = [("grant_type", "refresh_token"), ("refresh_token", creds.identity_token),
                        ("client_id", "lamina"), *query]
                resp = self.http.post(realm, data=dict(form))
            else:
                if creds is not None:
                    headers["Authorization"] = creds.basic_header()
                resp = self.http.get(realm, params=query, headers=headers)
        except httpx.HTTPError as e:
            raise transport_error(e, httpx.URL(realm).host, f"{what} (token server)") from None
        with contextlib.closing(resp):
            if resp.status_code in (401, 403):
                raise RegistryError(
                    f"{what}: the token server {httpx.URL(realm).host} refused "
                    f"{'the credentials' if creds else 'anonymous access'} "
                    f"(HTTP {resp.status_code})",
                    hint=CREDS_HINT if creds is None else
                    "check the user name and password given for this registry")
            if resp.status_code != 200:
                raise status_error(resp, self.ref.registry, f"{what} (token server)",
                                   self._creds is not None)
            try:
                doc = json.loads(resp.read()[:1 << 20])
            except ValueError:
                doc = None
        token = None
        if isinstance(doc, dict):
            token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{what}: the token server's answer has no token",
                                hint="the registry's token auth is misconfigured")
        return token

    def check(self, resp: httpx.Response, what: str, ok: tuple[int, ...] = (200,)) -> None:
        if resp.status_code not in ok:
            if not resp.is_closed:
                with contextlib.suppress(httpx.HTTPError):
                    resp.read()
                resp.close()
            raise status_error(resp, self.ref.registry, what, self._creds is not None)

    # -- manifests -------------------------------------------------------------------
    def get_manifest(self, repo: str, reference: str) -> FetchedManifest:
        """The manifest or index *reference* (tag or digest) names, verified."""
        what = f"manifest {self.ref.registry}/{repo}:{reference}" if ":" not in reference \
            else f"manifest {self.ref.registry}/{repo}@{reference}"
        resp = self.request("GET", self.url(repo, "manifests", reference), what=what,
                            headers={"Accept": MANIFEST_ACCEPT}, stream=True)
        try:
            self.check(resp, what)
            data = read_limited(resp, MAX_MANIFEST, what, self.ref.registry)
        finally:
            resp.close()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatchError(f"{what}: the registry sent a manifest whose digest is "
                                      f"{digest}", hint="the registry is corrupt or lying")
        said = resp.headers.get("Docker-Content-Digest")
        if said and said.startswith("sha256:") and said != digest:
            raise DigestMismatchError(
                f"{what}: Docker-Content-Digest says {said} but the manifest is {digest}",
                hint="the registry or a proxy changed the manifest; retry, or report it")
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise ImageFormatError(f"{what}: invalid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ImageFormatError(f"{what}: not a JSON object")
        media_type = doc.get("mediaType")
        if not isinstance(media_type, str):
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type not in mt.INDEX_TYPES and media_type not in mt.MANIFEST_TYPES:
            if doc.get("schemaVersion") == 1:
                raise ImageFormatError(f"{what}: Docker schema 1 manifests are not supported",
                                       hint="the image is very old; re-push it with a "
                                            "current tool")
            raise ImageFormatError(f"{what}: unsupported manifest type {media_type!r}")
        return FetchedManifest(data, media_type, digest, doc)

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        what = f"upload of manifest {self.ref.registry}/{repo}:{reference}"
        resp = self.request("PUT", self.url(repo, "manifests", reference), what=what,
                            headers={"Content-Type": media_type}, content=lambda: data)
        with contextlib.closing(resp):
            self.check(resp, what, ok=(200, 201, 202))
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        said = resp.headers.get("Docker-Content-Digest")
        if said and said.startswith("sha256:") and said != digest:
            raise DigestMismatchError(f"{what}: the registry stored it as {said}, not {digest}",
                                      hint="the registry rewrote the manifest")
        return digest

    # -- blobs -----------------------------------------------------------------------
    def blob_size(self, repo: str, digest: str) -> int | None:
        """The size of a blob the registry has, or None if it has not."""
        what = f"blob {self.ref.registry}/{repo}@{digest}"
        resp = self.request("HEAD", self.url(repo, "blobs", digest), what=what)
        with contextlib.closing(resp):
            if resp.status_code == 404:
                return None
            self.check(resp, what)
        try:
            return int(resp.headers.get("Content-Length", "-1"))
        except ValueError:
            return -1

    @contextlib.contextmanager
    def open_blob(self, repo: str, digest: str, start: int = 0,
                  end: int | None = None) -> Iterator[httpx.Response]:
        """A streaming answer for the blob's bytes *start*..*end* (inclusive; None =
        to the end).  Status 206 means the range was honoured; 200 means the whole
        blob is coming (the caller must skip *start* bytes)."""
        what = f"blob {self.ref.registry}/{repo}@{digest}"
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        resp = self.request("GET", self.url(repo, "blobs", digest), what=what,
                            headers=headers, stream=True)
        try:
            self.check(resp, what, ok=(200, 206))
            yield resp
        finally:
            resp.close()

    def start_upload(self, repo: str, digest: str | None = None,
                     from_repo: str | None = None) -> str | None:
        """Open an upload session; returns its URL, or None when the registry
        mounted *digest* from *from_repo* (no upload needed)."""
        url = self.url(repo, "blobs", "uploads/")
        params = {}
        if digest and from_repo:
            params = {"mount": digest, "from": from_repo}
        what = f"blob upload to {self.ref.registry}/{repo}"
        resp = self.request("POST", str(httpx.URL(url, params=params)), what=what,
                            headers={"Content-Length": "0"})
        with contextlib.closing(resp):
            if resp.status_code == 201 and params:
                return None
            self.check(resp, what, ok=(202,))
        return self._location(resp, what)

    def _location(self, resp: httpx.Response, what: str) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError(f"{what}: the registry's answer has no Location",
                                hint="the registry does not follow the distribution spec")
        return str(resp.url.join(loc))

    def upload_monolithic(self, location: str, digest: str, size: int,
                          body: Callable[[], Iterator[bytes]]) -> None:
        what = f"upload of blob {digest}"
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        resp = self.request("PUT", str(url), what=what, content=body,
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Length": str(size)})
        with contextlib.closing(resp):
            self.check(resp, what, ok=(201, 204))

    def upload_chunked(self, location: str, digest: str, size: int,
                       chunks: Callable[[], Iterator[bytes]]) -> None:
        """PATCH one chunk at a time with its Content-Range, then PUT the digest."""
        what = f"upload of blob {digest}"
        offset = 0
        for chunk in chunks():
            end = offset + len(chunk) - 1
            resp = self.request("PATCH", location, what=what, content=_const(chunk),
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Range": f"{offset}-{end}",
                                         "Content-Length": str(len(chunk))})
            with contextlib.closing(resp):
                self.check(resp, what, ok=(202, 204))
            location = self._location(resp, what)
            offset += len(chunk)
        if offset != size:
            raise DigestMismatchError(f"blob {digest}: read {offset} bytes, expected {size}")
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        resp = self.request("PUT", str(url), what=what, content=lambda: b"",
                            headers={"Content-Length": "0"})
        with contextlib.closing(resp):
            self.check(resp, what, ok=(201, 204))


def merge_scopes(scopes: Iterable[str]) -> list[str]:
    """One ``type:name:actions`` per resource, actions united, first-seen order."""
    actions: dict[tuple[str, str], list[str]] = {}
    other: list[str] = []
    for s in scopes:
        if not s:
            continue
        typ, sep, rest = s.partition(":")
        name, sep2, acts = rest.rpartition(":")
        if not (sep and sep2 and name):
            if s not in other:
                other.append(s)
            continue
        have = actions.setdefault((typ, name), [])
        have += [a for a in acts.split(",") if a and a not in have]
    return [f"{t}:{n}:{','.join(a)}" for (t, n), a in actions.items()] + other


def _const(data: bytes) -> Callable[[], bytes]:
    return lambda: data


# -- errors ------------------------------------------------------------------------------


def read_limited(resp: httpx.Response, limit: int, what: str, registry: str) -> bytes:
    buf = bytearray()
    try:
        for chunk in resp.iter_raw():
            buf += chunk
            if len(buf) > limit:
                raise ImageFormatError(f"{what}: larger than {limit} bytes",
                                       hint="the registry sent something that is not a "
                                            "manifest")
    except httpx.HTTPError as e:
        raise transport_error(e, registry, what) from None
    return bytes(buf)


def _body(resp: httpx.Response) -> bytes:
    try:
        return resp.content[:65536]
    except (httpx.HTTPError, RuntimeError):  # a streamed body that was not read
        return b""


def _registry_errors(resp: httpx.Response) -> str:
    """The registry's JSON error codes and messages, if it sent some."""
    try:
        doc = json.loads(_body(resp))
    except ValueError:
        return ""
    errs = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errs, list):
        return ""
    parts = []
    for e in errs[:4]:
        if isinstance(e, dict):
            code, msg = e.get("code"), e.get("message")
            parts.append(": ".join(str(x) for x in (code, msg) if x))
    return "; ".join(p for p in parts if p)


def status_error(resp: httpx.Response, registry: str, what: str,
                 have_creds: bool) -> LaminaError:
    code = resp.status_code
    detail = _registry_errors(resp)
    said = f" ({detail})" if detail else ""
    if code == 400 and b"HTTPS server" in _body(resp):
        return RegistryError(f"{what}: {registry} speaks https, not plain http (HTTP 400)",
                             hint="drop --insecure; pass --ca-cert FILE if a private CA "
                                  "signed its certificate")
    if code == 401:
        return RegistryError(
            f"{what}: authentication required (HTTP 401){said}",
            hint=("the registry rejected the credentials; check user and password"
                  if have_creds else CREDS_HINT))
    if code == 403:
        return RegistryError(f"{what}: access denied (HTTP 403){said}",
                             hint="the credentials lack permission for this repository")
    if code == 404:
        return NotFoundError(f"{what}: not found on {registry} (HTTP 404){said}",
                             hint="check the repository name and the tag or digest")
    if code == 429:
        return RegistryError(f"{what}: too many requests (HTTP 429){said}",
                             hint="the registry is rate-limiting; wait and retry")
    if code == 416:
        return RegistryError(f"{what}: range not satisfiable (HTTP 416){said}",
                             hint="the range starts past the end of the blob")
    if code >= 500:
        return RegistryError(f"{what}: the registry failed (HTTP {code}){said}",
                             hint="a server-side error: retry later, or check the "
                                  "registry's logs")
    return RegistryError(f"{what}: unexpected answer HTTP {code}{said}",
                         hint="the registry refused the request")


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def transport_error(e: httpx.HTTPError, host: str, what: str) -> RegistryError:
    chain = list(_chain(e))
    text = " ".join(str(x) for x in chain)
    if any(isinstance(x, ssl.SSLCertVerificationError) for x in chain) \
            or "CERTIFICATE_VERIFY_FAILED" in text:
        return RegistryError(f"{what}: TLS certificate of {host} not trusted ({e})",
                             hint="pass --ca-cert FILE with the CA that signed the "
                                  "registry's certificate")
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text \
            or "packet length too long" in text:
        return RegistryError(f"{what}: {host} does not speak TLS",
                             hint="for a plain-http registry on this machine pass --insecure")
    if any(isinstance(x, ssl.SSLError) for x in chain):
        return RegistryError(f"{what}: TLS failure talking to {host}: {e}",
                             hint="check the registry's TLS set-up; --ca-cert FILE adds a CA")
    if any(isinstance(x, ConnectionRefusedError) for x in chain) or "refused" in text:
        return RegistryError(f"{what}: connection to {host} refused",
                             hint=f"is the registry running and listening at {host}?")
    if isinstance(e, httpx.TimeoutException):
        return RegistryError(f"{what}: {host} timed out ({type(e).__name__})",
                             hint="the registry is slow or unreachable; retry, lamina "
                                  "resumes partial downloads")
    if isinstance(e, httpx.ConnectError):
        return RegistryError(f"{what}: cannot connect to {host}: {e}",
                             hint="check the registry's host name and port")
    if isinstance(e, httpx.TransportError):
        return RegistryError(f"{what}: connection to {host} lost: {e or type(e).__name__}",
                             hint="retry the same command: finished blobs are kept and an "
                                  "interrupted download resumes where it stopped")
    return RegistryError(f"{what}: {type(e).__name__}: {e}")
