"""The local API: how the CLI talks to its own running node, on loopback only.

The server is the standard library's ``ThreadingHTTPServer`` on its own
threads (no hand-rolled parsing). It relays envelopes that the CLI signed with
the user key; the node's receive pipeline authorizes them exactly as if they had
come over the network. Endpoints:

- ``GET /health``: JSON ``{status, node_id, did, peer_id, version, uptime_s}``
- ``POST /actor/invoke?timeout=S``: body a sealed envelope; answer the reply
  payload ``{ok, result}`` or ``{ok: false, code, reason}`` as MessagePack
- ``POST /actor/send``: relay without waiting for a reply
- ``POST /actor/broadcast``: publish an envelope on its topic

The daemon writes the address it bound to ``DMS_HOME/api.json`` and every
response names the node's peer id, so the CLI never talks to another node.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
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

log = logging.getLogger("dms.api")

API_FILE = "api.json"
PEER_HEADER = "X-Dms-Peer-Id"
LOOPBACK = "127.0.0.1"


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


class LocalApi:
    """The daemon side: serve the endpoints above for one actor system."""

    def __init__(self, system: ActorSystem, health: Callable[[], dict[str, Any]]) -> None:
        self.system = system
        self.health = health
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def start(self, port: int) -> None:
        handler = _handler_for(self)
        try:
            self._server = ThreadingHTTPServer((LOOPBACK, port), handler)
        except OSError as exc:
            raise ApiError(f"cannot listen on {LOOPBACK}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dms-api", daemon=True
        )
        self._thread.start()

    def record(self, home: Path) -> None:
        path = api_file(home)
        path.parent.mkdir(parents=True, exist_ok=True)
        address = ApiAddress(
            host=LOOPBACK, port=self.port, pid=os.getpid(), peer_id=self.system.peer_id
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(address.model_dump_json())
        os.replace(tmp, path)

    def stop(self, home: Path | None = None) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if home is not None:
            with contextlib.suppress(FileNotFoundError):
                path = api_file(home)
                if ApiAddress.model_validate_json(path.read_text()).pid == os.getpid():
                    path.unlink()

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
            return reply_payload(error=Refusal(err.code, err.reason))
        except TimeoutError:
            return reply_payload(error=Refusal(ErrorCode.TIMEOUT, f"no reply within {timeout:g} s"))


def _handler_for(api: LocalApi) -> type[BaseHTTPRequestHandler]:
    max_body = api.system.limits.max_data_bytes

    class Handler(BaseHTTPRequestHandler):
        server_version = f"dms/{__version__}"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("api: " + format, *args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header(PEER_HEADER, api.system.peer_id)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:
            if urlparse(self.path).path == "/health":
                self._json(HTTPStatus.OK, api.health())
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})

        def do_POST(self) -> None:
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
            headers = {"Content-Type": "application/octet-stream"}
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
                reason = json.loads(data).get("error", data.decode(errors="replace"))
            except ValueError:
                reason = data.decode(errors="replace")
            raise ApiError(f"the node refused the request: {reason}")
        return response.status, data
