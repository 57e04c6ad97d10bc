"""The station page's HTTP server: Starlette on uvicorn in a thread of its own beside the daemon.

| route | what | who |
| --- | --- | --- |
| `GET /` and `/static/*` | the page (one HTML file, vanilla JS, CSS) | viewers |
| `GET /api/info` | line, station, configured SKUs, whether controls are enabled | viewers |
| `GET /api/status` | the status document (as on MQTT) plus per-SKU counts | viewers |
| `GET /api/events` | server-sent events: `state` (1/s) and `frame` (≤ web.live_fps, latest wins) | viewers |
| `GET /api/ng` | the last NG parts in the archive, newest first | viewers |
| `GET /api/trend` | per minute of the last 24 h: OK, NG, fail-safe, OK-score quantiles (inspector/trend.py) | viewers |
| `GET /api/reviews` | the review queue: `?show=unreviewed/reviewed/all&kind=all/ng/ok`, newest part first | viewers |
| `GET /api/versions` | the inspecting SKU's versions in the store: the `versions` command's reply | viewers |
| `GET /archive/<sku>/<day>/<file>` | an archived frame, heat map (PNG) or verdict (JSON) | viewers |
| `GET /metrics` | Prometheus exposition | viewers, Prometheus |
| `POST /api/cmd` | CONTROL_COMMANDS: pause, resume, reload, sku, review, activate, rollback, teach | token holders |

Security: the server listens on 127.0.0.1 unless the operator sets web.host and web.open_view (and then a
loopback listener still only answers to loopback Host names, against DNS rebinding). Controls need the
token from web.token_file as `Authorization: Bearer <token>`, a same-origin (or web.allowed_origins)
Origin when a browser sends one, a JSON body of at most MAX_BODY bytes and a known command; anything else
gets a 4xx with a one-line JSON error before the daemon is involved (a review also needs a well-formed request,
400, for a part still archived or kept, 404). Accepted commands go through
`inspector.mqtt.run_command` into the daemon's handler, exactly as a /cmd message does, with the same reply
(HTTP 200 when ok, 409 when the station could not do it).

Token guessing: a client (by IP address) that sends TOKEN_FAILURES (5) control requests without the right token
(missing or wrong) within TOKEN_WINDOW_S (10 s) of its first one gets HTTP 429 with Retry-After for every
control request, a right token included, until that window ends; other clients are not affected. Such requests
are not logged one by one: each client's window is one `web_token_failures` warning with its counts
(`failures`, `locked_out`), logged when the window ends. The window runs on a monotonic clock.

Malformed paths (a NUL byte, a name too long for the filesystem) get a 4xx like any other bad request; client
input never produces a 500 or a traceback in the log.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import itertools
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from foundation.errors import ConfigError, InspectorError
from foundation.log import get_logger
from inspector.activation import check_command
from inspector.archive import Archive
from inspector.config import REVIEWS_DIR, WebConfig, is_loopback
from inspector.mqtt import parse_command, run_command
from inspector.pipeline import Published
from inspector.reviews import PartNotFound, Review, ReviewError, ReviewStore, parse_review
from inspector.trend import Trend
from inspector.web.live import Broadcast, LiveFeed, frame_event
from inspector.web.metrics import StationMetrics

log = get_logger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
ARCHIVE_CACHE = "private, max-age=86400, immutable"  # archived files are written once and never change
MAX_BODY = 4096  # bytes of a control request; commands are tiny JSON objects
CONTROL_COMMANDS = ("pause", "resume", "reload", "sku", "review", "activate", "rollback", "teach")
QUEUE_SHOW = ("unreviewed", "reviewed", "all")  # the review queue's ?show= (all: not yet reviewed ones first)
QUEUE_KINDS = ("all", "ng", "ok")  # and its ?kind=
QUEUE_LIMIT = 60  # parts the review queue lists, newest first
ARCHIVE_SUFFIXES = (".png", ".json")
STATE_INTERVAL_S = 1.0
TOKEN_FAILURES = 5  # control requests without the right token a client may send per window before a lockout
TOKEN_WINDOW_S = 10.0  # the window, from the client's first such request
START_TIMEOUT_S = 15.0
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


class Station(Protocol):
    """What the page needs from the daemon (inspector.service.Daemon)."""

    archive: Archive | None
    reviews: ReviewStore | None
    trend: Trend

    def handle_command(self, command: dict[str, Any], *, loading_reply: bool = True,
                       client: str = "mqtt") -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...


class Refused(Exception):
    """A request turned away with a 4xx and a one-line reason; `aggregated` ones are counted in the client's
    web_token_failures line instead of logged one by one."""

    def __init__(self, status: int, error: str, *, headers: dict[str, str] | None = None,
                 aggregated: bool = False) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers
        self.aggregated = aggregated


@dataclass
class _Burst:
    """One client's control requests without the right token, from the first one of its window."""

    start: float
    failures: int = 0  # token missing or wrong
    locked_out: int = 0  # refused with 429 unread, once failures reached the budget


class TokenFailures:
    """Per-client budget of control requests without the right token (module docstring): lockout and one log
    line per client and window; `clock` is monotonic seconds (injectable, so tests need not wait)."""

    def __init__(self, budget: int = TOKEN_FAILURES, window_s: float = TOKEN_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.window_s = window_s
        self._clock = clock
        self._bursts: dict[str, _Burst] = {}
        self._lock = threading.Lock()  # the event loop counts, the render thread sweeps

    def retry_after(self, client: str) -> int | None:
        """Whole seconds until a locked-out client may try again (this request counted as refused), else None."""
        with self._lock:
            now = self._clock()
            self._close(now)
            burst = self._bursts.get(client)
            if burst is None or burst.failures < self.budget:
                return None
            burst.locked_out += 1
            return max(1, math.ceil(burst.start + self.window_s - now))

    def failed(self, client: str) -> None:
        """Count one control request from `client` without the right token."""
        with self._lock:
            now = self._clock()
            self._close(now)
            self._bursts.setdefault(client, _Burst(now)).failures += 1

    def sweep(self, *, final: bool = False) -> None:
        """Log and forget the windows that ended (every window with `final`, at stop)."""
        with self._lock:
            self._close(math.inf if final else self._clock())

    def _close(self, now: float) -> None:
        """One web_token_failures line for each window that ended by `now`."""
        for client, burst in list(self._bursts.items()):
            if now >= burst.start + self.window_s:
                del self._bursts[client]
                log.warning("web_token_failures", client=client, failures=burst.failures,
                            locked_out=burst.locked_out, window_s=self.window_s,
                            detail="control requests without the right token")


class StationWeb:
    """The page, its live feed and /metrics for one station; bound at construction, served after start()."""

    def __init__(self, cfg: WebConfig, station: Station, *, skus: Sequence[str],
                 defect_types: Mapping[str, Sequence[str]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """defect_types: per SKU, what a confirmed defect may be labelled; clock: monotonic seconds for the
        token-failure windows (a test moves its own)."""
        self.cfg = cfg
        self.station = station
        self.skus = list(skus)
        self.defect_types = {sku: list(types) for sku, types in (defect_types or {}).items()}
        self.token = cfg.read_token()
        self.token_failures = TokenFailures(clock=clock)
        self.feed = LiveFeed()
        self.metrics = StationMetrics(station.status)
        self.broadcast = Broadcast()
        self._ready = threading.Event()
        self._halt = threading.Event()
        self._socket = _listen(cfg.host, cfg.port)
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(
            self._app(), log_config=None, log_level="warning", access_log=False, lifespan="on", http="h11",
            ws="none", loop="asyncio", timeout_graceful_shutdown=2, server_header=False,
        ))
        self._threads = [threading.Thread(target=self._serve, name="web-server", daemon=True),
                         threading.Thread(target=self._render_loop, name="web-live", daemon=True)]

    @property
    def url(self) -> str:
        """Where the page is, as a browser on this box opens it."""
        return self.cfg.page_url(self.port)

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> StationWeb:
        """Serve in the background; returns once the server takes requests."""
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready.wait(0.1):
            if not self._threads[0].is_alive() or time.monotonic() > deadline:
                self._socket.close()
                raise InspectorError(f"station page on {self.url} did not start (see the log above)")
        log.info("web_started", url=self.url, controls=self.token is not None, open_view=self.cfg.open_view)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the event streams, stop the server and the render thread, release the port."""
        self._halt.set()
        self.broadcast.close()
        self._server.should_exit = True
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout_s)
        self._socket.close()
        self.token_failures.sweep(final=True)

    def observe(self, item: Published) -> None:
        """The pipeline's on_published hook (publish thread): count it for /metrics, offer it to the live view."""
        self.metrics.observe(item.verdict)
        self.feed.offer(item)

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException:  # uvicorn ends start-up failures with SystemExit; never let it pass silently
            log.exception("web_server_failed")

    def _render_loop(self) -> None:
        """While a page is open: the state once a second, the newest verdict's overlay at most live_fps times;
        always: log the token-failure windows that ended."""
        frame_period = 1.0 / self.cfg.live_fps
        next_state = 0.0
        rendered = 0
        while not self._halt.wait(frame_period):
            self.token_failures.sweep()
            if not self.broadcast.clients:
                continue
            try:
                now = time.monotonic()
                if now >= next_state:
                    next_state = now + STATE_INTERVAL_S
                    self.broadcast.put("state", json.dumps(self.state(), default=str))
                seq, item = self.feed.latest()
                if item is not None and seq != rendered:
                    rendered = seq
                    self.broadcast.put("frame", json.dumps(frame_event(seq, item), default=str))
            except Exception:
                log.exception("web_live_failed")

    def state(self) -> dict[str, Any]:
        """The status document plus per-SKU counts and the number of open pages."""
        return {"status": self.station.status(), "skus": self.feed.counts(), "pages": self.broadcast.clients,
                "ts": time.time()}

    # ---- the app ---------------------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            self.broadcast.bind(asyncio.get_running_loop())
            self._ready.set()
            yield

        middleware = [Middleware(SecurityHeaders)]
        if is_loopback(self.cfg.host) and ":" not in self.cfg.host:
            middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"]))
        routes = [
            Route("/", lambda _request: FileResponse(STATIC / "index.html")),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            Route("/api/info", self._info),
            Route("/api/status", self._status),
            Route("/api/events", self._events),
            Route("/api/ng", self._ng_parts),
            Route("/api/trend", lambda _request: _json(self.station.trend.series())),
            Route("/api/reviews", self._review_queue),
            Route("/api/versions", self._versions),
            Route("/api/cmd", self._command, methods=["POST"]),
            Route("/archive/{path:path}", self._archive_file),
            Route("/metrics", self._metrics),
        ]
        return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                         exception_handlers={Refused: _refused})

    def _info(self, _request: Request) -> JSONResponse:
        status = self.station.status()
        return JSONResponse({"line": status.get("line"), "station": status.get("station"), "skus": self.skus,
                             "controls": self.token is not None, "live_fps": self.cfg.live_fps})

    def _status(self, _request: Request) -> Response:
        return _json(self.state())

    async def _events(self, _request: Request) -> StreamingResponse:
        return StreamingResponse(self.broadcast.stream(), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    def _metrics(self, _request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def _ng_parts(self, _request: Request) -> JSONResponse:
        """The strip: each NG part's verdict and the URLs of its frame, heat map and verdict JSON."""
        archive = self.station.archive
        if archive is None:
            return JSONResponse({"archive": False, "parts": []})
        stems = (path.relative_to(archive.root).as_posix()[: -len(".json")]
                 for path in archive.recent_ng(self.cfg.ng_strip))
        parts = [part for stem in stems if (part := _archived_part(archive.root, stem)) is not None]
        return JSONResponse({"archive": True, "parts": parts})

    def _review_queue(self, request: Request) -> Response:
        """The review queue: parts not yet reviewed (from the archive), then reviewed ones (their kept copies, with
        their latest review), each newest first, as ?show= and ?kind= select; and each SKU's defect types."""
        show = request.query_params.get("show", "unreviewed")
        kind = request.query_params.get("kind", "all")
        if show not in QUEUE_SHOW or kind not in QUEUE_KINDS:
            raise Refused(400, f"the queue takes ?show={'|'.join(QUEUE_SHOW)} and ?kind={'|'.join(QUEUE_KINDS)}")
        archive, reviews = self.station.archive, self.station.reviews
        if archive is None or reviews is None:
            return _json({"archive": False, "parts": [], "defect_types": self.defect_types})
        latest = reviews.latest()
        kinds = ("_ng", "_ok") if kind == "all" else (f"_{kind}",)

        def unreviewed() -> Iterator[tuple[str, str, Review | None]]:
            for path in archive.parts():
                part = path.relative_to(archive.root).as_posix()[: -len(".json")]
                if part not in latest and part.endswith(kinds):
                    yield part, part, None

        def reviewed() -> Iterator[tuple[str, str, Review | None]]:
            for part in sorted(latest, key=lambda p: p.partition("/")[2], reverse=True):
                if part.endswith(kinds):
                    yield part, f"{REVIEWS_DIR}/{part}", latest[part]

        listed = itertools.chain(unreviewed() if show != "reviewed" else (),
                                 reviewed() if show != "unreviewed" else ())
        parts: list[dict[str, Any]] = []
        for part, stem, review in listed:
            entry = _archived_part(archive.root, stem)
            if entry is not None:
                parts.append(entry | {"part": part, "review": review.model_dump(mode="json") if review else None})
                if len(parts) == QUEUE_LIMIT:
                    break
        return _json({"archive": True, "parts": parts, "defect_types": self.defect_types})

    def _archive_file(self, request: Request) -> FileResponse:
        """An archived file; anything outside the archive folder or not a PNG/JSON is refused."""
        relative = Path(request.path_params["path"])
        archive = self.station.archive
        if archive is None:
            raise Refused(404, "the archive is disabled ([archive] enabled = false)")
        if relative.is_absolute() or ".." in relative.parts:
            raise Refused(400, "archive paths are relative to the archive folder and never contain '..'")
        root = archive.root.resolve()
        try:
            target = (root / relative).resolve()
            found = target.is_relative_to(root) and target.suffix in ARCHIVE_SUFFIXES and target.is_file()
        except (ValueError, OSError):  # a NUL byte, a name too long for the filesystem: no such file
            found = False
        if not found:
            raise Refused(404, f"{relative.as_posix()} is not an archived frame, heat map or verdict")
        return FileResponse(target, headers={"cache-control": ARCHIVE_CACHE})

    async def _command(self, request: Request) -> Response:
        """A control from the page: checked in full here, then run like a /cmd message."""
        client = request.client.host if request.client else "?"
        try:
            command = await self._checked_command(request, client)
        except Refused as exc:
            if not exc.aggregated:
                log.warning("web_command_refused", status=exc.status, error=exc.error, client=client)
            raise
        handler = functools.partial(self.station.handle_command, loading_reply=False, client=f"web {client}")
        reply = await run_in_threadpool(run_command, command, handler)
        log.info("web_command", command=command, ok=reply.get("ok"), client=client)
        return _json(reply, 200 if reply.get("ok") else 409)

    async def _checked_command(self, request: Request, client: str) -> dict[str, Any]:
        """Lockout, token, origin, size and shape of a control request; Refused says what is wrong."""
        if self.token is None:
            raise Refused(403, "controls are disabled on this station: set web.token_file in inspector.toml")
        retry_s = self.token_failures.retry_after(client)
        if retry_s is not None:
            raise Refused(429, f"too many requests without the right control token from {client}; retry in "
                          f"{retry_s} s", headers={"retry-after": str(retry_s)}, aggregated=True)
        origin = request.headers.get("origin")
        if origin is not None and origin not in self._allowed_origins(request):
            raise Refused(403, f"origin {origin} may not send controls (add it to web.allowed_origins)")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            self.token_failures.failed(client)
            raise Refused(401, "missing control token: send 'Authorization: Bearer <token from web.token_file>'",
                          aggregated=True)
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            self.token_failures.failed(client)
            raise Refused(403, "wrong control token", aggregated=True)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise Refused(415, "send the command as Content-Type: application/json")
        body = await _read_body(request, MAX_BODY)
        try:
            command = parse_command(body)
        except ValueError as exc:
            raise Refused(400, f"malformed command: {exc}") from None
        name = command.get("cmd")
        if name not in CONTROL_COMMANDS:
            raise Refused(400, f"unknown command {name!r}: use one of {', '.join(CONTROL_COMMANDS)}")
        if name in ("sku", "teach") and command.get("sku") not in self.skus:
            sku = command.get("sku")
            request = "a changeover" if name == "sku" else "teach"
            what = f"unknown SKU {sku!r}" if sku is not None else f'{request} needs "sku"'
            raise Refused(400, f"{what}: configured SKUs are {', '.join(self.skus)}")
        if name == "review":
            self._check_review(command)
        if name in ("activate", "rollback"):
            self._check_activation(name, command)
        return command

    def _check_activation(self, name: str, command: dict[str, Any]) -> None:
        """An activate/rollback request's shape and SKU (400), checked before the daemon runs it."""
        try:
            sku = check_command(name, command)[0]
        except InspectorError as exc:
            raise Refused(400, str(exc)) from None
        if sku not in self.skus:
            raise Refused(400, f"unknown SKU {sku!r}: configured SKUs are {', '.join(self.skus)}")

    async def _versions(self, _request: Request) -> Response:
        """The inspecting SKU's versions (the `versions` command; ok false, with why, when it is not in the store)."""
        return _json(await run_in_threadpool(run_command, {"cmd": "versions"}, self.station.handle_command))

    def _check_review(self, command: dict[str, Any]) -> None:
        """A review's request (400) and its part (404), checked before the daemon records it."""
        try:
            part = parse_review(command, self.defect_types).part
        except ReviewError as exc:
            raise Refused(400, str(exc)) from None
        reviews = self.station.reviews
        if reviews is None:
            raise Refused(404, "the archive is disabled ([archive] enabled = false): there are no parts to review")
        try:
            reviews.verdict_file(part)
        except PartNotFound as exc:
            raise Refused(404, str(exc)) from None

    def _allowed_origins(self, request: Request) -> set[str]:
        host = request.headers.get("host", "")
        return {f"http://{host}", f"https://{host}", *self.cfg.allowed_origins}


def _archived_part(root: Path, stem: str) -> dict[str, Any] | None:
    """An archived part's verdict and the URLs of its verdict JSON, frame and heat map (None where absent); None
    when its verdict cannot be read (deleted by the size cap in between, or being written)."""
    try:
        verdict = json.loads((root / f"{stem}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = {"json": f"{stem}.json", "image": f"{stem}.png", "heat": f"{stem}_heat.png"}
    return {"verdict": verdict} | {k: f"archive/{v}" if (root / v).is_file() else None for k, v in files.items()}


def _json(data: dict[str, Any], status: int = 200) -> Response:
    """A JSON response for documents that hold paths or other non-JSON values (as str, like the MQTT status)."""
    return Response(json.dumps(data, default=str), status_code=status, media_type="application/json")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Refused(413, f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused(413, f"request body over {limit} bytes")
    return bytes(body)


async def _refused(_request: Request, exc: Exception) -> JSONResponse:
    """A Refused request as {"ok": false, "error": ...} with its status code."""
    assert isinstance(exc, Refused)
    return JSONResponse({"ok": False, "error": exc.error}, status_code=exc.status, headers=exc.headers)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response (no framing, no sniffing, scripts from this server only)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; a taken port or a bad address is a ConfigError naming the key."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"web.host = {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"web: cannot listen on {host}:{port} ({exc.strerror}); set web.port to a free port "
                          "or web.enabled = false") from None
    sock.set_inheritable(False)
    return sock
