"""The local API: how the CLI talks to its own running node, on loopback only.

The server is the standard library's ``ThreadingHTTPServer`` on its own
threads (no hand-rolled parsing). It relays envelopes that the CLI signed with
the user key; the node's receive pipeline authorizes them exactly as if they had
come over the network. Endpoints:

- ``GET /health``: JSON ``{status, node_id, did, peer_id, version, uptime_s}``
- ``GET /config``: the node's effective settings (``dms config show``)
- ``GET /metrics``: Prometheus text format (``dms.node.metrics``, ``specs/metrics.md``)
- ``POST /actor/invoke?timeout=S``: body a sealed envelope; answer the reply
  payload ``{ok, result}`` or ``{ok: false, code, reason}`` as MessagePack
- ``POST /actor/send``: relay without waiting for a reply
- ``POST /actor/broadcast``: publish an envelope on its topic

The daemon writes the address it bound to ``DMS_HOME/api.json`` and every
response names the node's peer id, so the CLI never talks to another node.

Who may use it (a browser page or another local user must not borrow the
node's identity):

- every request must name a loopback host in its ``Host`` header (``bad_host``),
  which a page that rebinds its DNS name to 127.0.0.1 cannot do;
- every request but ``/health`` must carry ``X-Dms-Token``, the random token the
  daemon writes at each start to ``DMS_HOME/api.token`` (mode 0600): the caller
  proves it can read this home (``unauthorized``). ``Authorization: Bearer TOKEN``
  carries it too, as a Prometheus scrape sends it (``credentials_file``);
- the API relays only envelopes signed by a key anchored as root of this node
  (``forbidden``): the node never speaks for a key it does not trust.

What a local caller can make it hold: at most ``api_max_connections`` connections
at once (one thread each); one more is answered ``503`` (``busy``) and closed at
once. A connection idle for ``api_timeout_s`` (no request, or a request that
stops half way) is closed. Its log lines never hold a token: not the headers,
and no query string (a token passed as ``?token=...`` would otherwise be written
to the daemon's log).
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import logging
import os
import re
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import msgpack
from pydantic import BaseModel

from dms import __version__
from dms.actor import ActorSystem, ErrorCode, Refusal, RemoteError, unseal, verify
from dms.actor.envelope import check_time, now_ns
from dms.actor.system import reply_payload
from dms.errors import DmsError
from dms.files import write_private

log = logging.getLogger("dms.api")

API_FILE = "api.json"
TOKEN_FILE = "api.token"
PEER_HEADER = "X-Dms-Peer-Id"
TOKEN_HEADER = "X-Dms-Token"
LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_CONNECTIONS = 32
IDLE_TIMEOUT_S = 30.0
_QUERY = re.compile(r"\?[^\s\"']*")  # a query string in a request line or path


class ApiError(DmsError):
    """The local node cannot be reached, or it is not this home's node."""


class WrongNodeError(ApiError):
    """The API on the recorded address answers for another node."""


class ApiAddress(BaseModel):
    host: str
    port: int
    pid: int
    peer_id: str


def api_file(home: Path) -> Path:
    return Path(home) / API_FILE


def token_file(home: Path) -> Path:
    return Path(home) / TOKEN_FILE


def loopback_host(header: str | None) -> bool:
    """A ``Host`` header naming this machine's loopback (any port)."""
    if not header:
        return False
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:port
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in LOOPBACK_NAMES


class ApiRefusal(Exception):
    """An HTTP-level refusal: status, reason code and one line."""

    def __init__(self, status: HTTPStatus, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


def without_query(text: str) -> str:
    """``text`` (a path or a request line) with any query string cut: for logs."""
    return _QUERY.sub("?...", text)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them: one more is
    answered 503 (``busy``) from the accepting thread and closed."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        on_busy: Callable[[], bytes],
    ) -> None:
        self.max_connections = max_connections
        self._on_busy = on_busy
        self._open = 0
        self._open_lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._wake, self._waker = socket.socketpair()
        try:
            super().__init__(address, handler)
        except BaseException:
            self._wake.close()
            self._waker.close()
            raise

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """socketserver's loop, woken by :meth:`shutdown` through a socket pair instead
        of polling for it: with its 0.5 s poll, every node's stop took half a second."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    ready = selector.select()
                    if self._stopping.is_set():
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop the loop of :meth:`serve_forever` (running in another thread) and wait
        for it to end."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._waker.send(b"\0")
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake.close()
        self._waker.close()

    @property
    def open_connections(self) -> int:
        return self._open

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            busy = self._open >= self.max_connections
            if not busy:
                self._open += 1
        if busy:
            try:
                request.settimeout(1.0)
                request.sendall(self._on_busy())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed()

    def _closed(self) -> None:
        with self._open_lock:
            self._open -= 1


class LocalApi:
    """The daemon side: serve the endpoints above for one actor system."""

    def __init__(
        self,
        system: ActorSystem,
        health: Callable[[], dict[str, Any]],
        config: Callable[[], dict[str, Any]] | None = None,
        metrics: Callable[[], bytes] | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.system = system
        self.health = health
        self.config = config or (lambda: {})
        self.metrics = metrics
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.token = secrets.token_urlsafe(32)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def open_connections(self) -> int:
        return self._server.open_connections if self._server is not None else 0

    def start(self, port: int) -> None:
        handler = _handler_for(self)
        try:
            self._server = _Server((LOOPBACK, port), handler, self.max_connections, self._busy)
        except OSError as exc:
            raise ApiError(f"cannot listen on {LOOPBACK}:{port}: {exc.strerror or exc}") from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dms-api", daemon=True
        )
        self._thread.start()

    def record(self, home: Path) -> None:
        """Write the token (0600), then the address: a client that finds the address
        finds the token of the same run."""
        write_private(token_file(home), self.token)
        path = api_file(home)
        address = ApiAddress(
            host=LOOPBACK, port=self.port, pid=os.getpid(), peer_id=self.system.peer_id
        )
        write_private(path, address.model_dump_json())

    def check_caller(self, host: str | None, token: str | None, *, need_token: bool) -> None:
        if not loopback_host(host):
            raise ApiRefusal(
                HTTPStatus.FORBIDDEN,
                ErrorCode.BAD_HOST,
                f"Host {host!r} is not a loopback name: the local API serves this machine only",
            )
        if need_token and not (token and hmac.compare_digest(token, self.token)):
            raise ApiRefusal(
                HTTPStatus.UNAUTHORIZED,
                ErrorCode.UNAUTHORIZED,
                f"no valid {TOKEN_HEADER}: send the token in DMS_HOME/{TOKEN_FILE}",
            )

    def _busy(self) -> bytes:
        """The whole answer to a connection over the cap (counted and logged)."""
        self.system.refusals[str(ErrorCode.BUSY)] += 1
        reason = (
            f"the local API serves {self.max_connections} connections at once "
            "(api_max_connections): try again"
        )
        log.warning("local API refused a connection: busy: %s", reason)
        body = json.dumps({"error": reason, "code": str(ErrorCode.BUSY)}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{PEER_HEADER}: {self.system.peer_id}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode() + body

    def stop(self, home: Path | None = None) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if home is not None:
            with contextlib.suppress(FileNotFoundError, ValueError):
                path = api_file(home)
                if ApiAddress.model_validate_json(path.read_text()).pid == os.getpid():
                    path.unlink()
                    token_file(home).unlink(missing_ok=True)

    # ---- relaying ---------------------------------------------------------------

    def relay(self, kind: str, frame: bytes, timeout: float) -> dict[str, Any]:
        """Check the CLI's envelope, then hand it to the actor system."""
        try:
            sealed = unseal(frame, self.system.limits.max_data_bytes)
            limits = self.system.limits
            check_time(sealed.envelope, now_ns(), limits.max_ttl_s, limits.clock_skew_s)
            verify(sealed)
        except Refusal as refusal:
            return reply_payload(error=refusal)
        env = sealed.envelope
        if env.sender.address.host != self.system.peer_id:
            return reply_payload(
                error=Refusal(ErrorCode.WRONG_SIGNER, "the sender must name this node as its host")
            )
        if not self.system.trust.is_root(env.signer):
            return reply_payload(
                error=Refusal(
                    ErrorCode.FORBIDDEN,
                    f"{env.sender.did} is not a root of this node: the local API relays "
                    "only envelopes signed by a key anchored as root (see 'dms init')",
                )
            )
        try:
            if kind == "broadcast":
                if env.topic is None:
                    raise Refusal(ErrorCode.MALFORMED, "a broadcast needs a topic")
                self.system.publish(env.topic, frame)
                return reply_payload({"published": env.topic})
            if env.to is None:
                raise Refusal(ErrorCode.MALFORMED, "the envelope has no destination")
            if kind == "send":
                self.system.route(frame, env.to)
                return reply_payload({"sent": True})
            future = self.system.invoke_frame(frame, env, timeout)
            return reply_payload(future.result(timeout + 1.0))
        except Refusal as refusal:
            return reply_payload(error=refusal)
        except RemoteError as err:
            return reply_payload(error=Refusal(err.code, err.reason, rule=err.rule))
        except TimeoutError:
            return reply_payload(error=Refusal(ErrorCode.TIMEOUT, f"no reply within {timeout:g} s"))


def _handler_for(api: LocalApi) -> type[BaseHTTPRequestHandler]:
    max_body = api.system.limits.max_data_bytes

    class Handler(BaseHTTPRequestHandler):
        server_version = f"dms/{__version__}"
        protocol_version = "HTTP/1.1"
        timeout = api.timeout_s  # every read and write of the connection: idle ones close

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("api: %s", without_query(format % args))

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header(PEER_HEADER, api.system.peer_id)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _caller_refused(self, *, need_token: bool) -> bool:
            """Refuse (and answer) a caller that is not this home's user on this machine."""
            token = self.headers.get(TOKEN_HEADER)
            scheme, _, bearer = (self.headers.get("Authorization") or "").partition(" ")
            if token is None and scheme.lower() == "bearer":
                token = bearer.strip()
            try:
                api.check_caller(self.headers.get("Host"), token, need_token=need_token)
            except ApiRefusal as refusal:
                api.system.refusals[str(refusal.code)] += 1
                log.warning(
                    "local API refused %s %s: %s", self.command, without_query(self.path), refusal
                )
                self.close_connection = True
                self._json(refusal.status, {"error": refusal.reason, "code": str(refusal.code)})
                return True
            return False

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if self._caller_refused(need_token=path != "/health"):
                return
            if path == "/health":
                self._json(HTTPStatus.OK, api.health())
            elif path == "/config":
                self._json(HTTPStatus.OK, api.config())
            elif path == "/metrics" and api.metrics is not None:
                self._send(HTTPStatus.OK, api.metrics(), METRICS_CONTENT_TYPE)
            else:
                self._json(
                    HTTPStatus.NOT_FOUND, {"error": f"no endpoint {urlparse(self.path).path}"}
                )

        def do_POST(self) -> None:
            if self._caller_refused(need_token=True):
                return
            url = urlparse(self.path)
            kind = url.path.removeprefix("/actor/")
            if not url.path.startswith("/actor/") or kind not in ("invoke", "send", "broadcast"):
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {url.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                timeout = float(parse_qs(url.query).get("timeout", ["10"])[0])
            except ValueError:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "bad length or timeout"})
                return
            if not 0 < length <= max_body or not 0 < timeout <= 3600:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "body size or timeout out of range"})
                return
            frame = self.rfile.read(length)
            answer = api.relay(kind, frame, timeout)
            self._send(HTTPStatus.OK, msgpack.packb(answer), "application/msgpack")

    return Handler


class ApiClient:
    """The CLI side: find this home's node and relay envelopes to it."""

    def __init__(self, home: Path, expected_peer_id: str) -> None:
        self.home = Path(home)
        self.expected_peer_id = expected_peer_id
        path = api_file(self.home)
        try:
            self.address = ApiAddress.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise ApiError(
                f"no node is running for {self.home}: start one with 'dms run'"
            ) from None
        except ValueError:
            raise ApiError(f"{path} is damaged: restart the node with 'dms run'") from None
        try:
            self.token = token_file(self.home).read_text().strip()
        except FileNotFoundError:
            raise ApiError(
                f"{token_file(self.home)} is missing: restart the node with 'dms run'"
            ) from None
        except PermissionError:
            raise ApiError(
                f"cannot read {token_file(self.home)}: only the user who runs the node can "
                "use its API"
            ) from None

    def config(self, timeout: float = 5.0) -> dict[str, Any]:
        """The running daemon's effective settings (its command-line flags included)."""
        _, body = self._request("GET", "/config", None, timeout)
        return json.loads(body)

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        _, body = self._request("GET", "/health", None, timeout)
        return json.loads(body)

    def relay(self, kind: str, frame: bytes, timeout: float) -> dict[str, Any]:
        _, body = self._request("POST", f"/actor/{kind}?timeout={timeout:g}", frame, timeout + 5.0)
        answer = msgpack.unpackb(body, raw=False)
        if not isinstance(answer, dict) or "ok" not in answer:
            raise ApiError("the node sent an answer that is not a reply")
        return answer

    def _request(
        self, method: str, path: str, body: bytes | None, timeout: float
    ) -> tuple[int, bytes]:
        where = f"{self.address.host}:{self.address.port}"
        conn = http.client.HTTPConnection(self.address.host, self.address.port, timeout=timeout)
        started = time.monotonic()
        try:
            headers = {"Content-Type": "application/octet-stream", TOKEN_HEADER: self.token}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, TimeoutError) or time.monotonic() - started >= timeout:
                raise ApiError(f"the node at {where} did not answer within {timeout:g} s") from None
            raise ApiError(
                f"no node answers at {where} (is 'dms run' still running for {self.home}?)"
            ) from None
        finally:
            conn.close()
        peer = response.getheader(PEER_HEADER)
        if peer != self.expected_peer_id:
            raise WrongNodeError(
                f"the API at {where} belongs to node {peer}, not to this home's node "
                f"{self.expected_peer_id}; restart 'dms run' for {self.home}"
            )
        if response.status != HTTPStatus.OK:
            try:
                answer = json.loads(data)
                reason = answer.get("error", data.decode(errors="replace"))
                code = answer.get("code")
            except (ValueError, AttributeError):
                reason, code = data.decode(errors="replace"), None
            error = ApiError(f"the node refused the request: {f'{code}: ' if code else ''}{reason}")
            if code:
                error.code = code
            raise error
        return response.status, data
