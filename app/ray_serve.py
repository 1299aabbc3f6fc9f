"""``deepfeat serve --engine ray``: the same HTTP API on Ray Serve, read replicas on many hosts.

Two deployments in one Serve application::

    HTTP -> Serve proxy (every node) -> Search x N  (ingress: the deepfeat FastAPI app, read-only,
                                         |              on the latest published generation)
                                         |  adds, deletes, POST /v1/admin/publish
                                         v
                                       Writer x 1   (the deepfeat FastAPI app on the live data dir;
                                                     publishes a generation every publish_interval_s)

* **Search** replicas run :func:`deepfeat.app.main.create_app` unchanged, on a read-only store opened on
  a published generation (:mod:`deepfeat.index.publish`): a self-contained copy of the catalog and the
  index, never the writer's live files, so a replica may run on any host that can read the generations
  location. Every ``refresh_interval_s`` a replica reads ``LATEST``; a newer publication is fetched,
  verified (sha256 of every file) and opened aside, then swapped in: requests in flight finish on the
  store they started with, which is closed :data:`RETIRE_S` later. A publication that fails its checks
  is logged and skipped until another one is published; the replica keeps serving what it has.
* Requests for write routes (those guarded by :func:`deepfeat.app.deps.require_write`, and
  ``POST /v1/admin/publish``) are not run by a replica: :class:`ForwardWrites` sends the raw request to
  the **Writer** through a DeploymentHandle, which runs it on its own copy of the same app
  (:func:`call_asgi`), so status codes, error codes and bodies are those of ``deepfeat serve``.
* Concurrent requests on a replica share forward passes through Serve's ``@serve.batch``
  (:class:`ServeBatcher`, with the ``DEEPFEAT_BATCH_*`` limits), which takes the place of the
  micro-batcher ``deepfeat serve`` runs in a thread of its own.

Visibility: an image added through the writer is searchable on the replicas once a publish that
includes it has been fetched, i.e. within ``publish_interval_s`` + ``refresh_interval_s`` + the publish
and fetch times, or right after ``POST /v1/admin/publish`` returns + ``refresh_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel
from ray import serve

from deepfeat.app.deps import AppState, require_write
from deepfeat.app.inference import Inference
from deepfeat.app.main import create_app
from deepfeat.classifiers import CLASSIFIERS_DIR, ClassifierRegistry
from deepfeat.index.build import build_generation, process_rss_bytes
from deepfeat.index.errors import CorruptStoreError, InvalidArgumentError, StoreError
from deepfeat.index.publish import Location, Publication, fetch, latest, publish
from deepfeat.models.errors import Overloaded
from deepfeat.runtime import open_store
from deepfeat.settings import Settings

__all__ = [
    "RETIRE_S",
    "RayServeOptions",
    "build_application",
    "call_asgi",
    "run",
]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

APP_NAME = "deepfeat"
RETIRE_S = 30.0
"""How long a replica keeps the store it switched away from open, for requests still using it."""
FIRST_PUBLICATION_TIMEOUT_S = 600.0
"""How long a starting replica waits for the writer's first publication before Serve restarts it."""
WRITER_TIMEOUT_S = 120.0
"""A forwarded write that gets no answer from the writer within this is answered 503."""
REBUILD_SHARE = 0.1
"""With ``publish_index`` set, the IVF generation is rebuilt before a publish once the catalog differs
from it by this share of its images (the rows beyond it are served exactly, as the replicas' delta)."""
BUILD_BUDGET_BYTES = 1 << 30
"""Memory an IVF build in the writer may use on top of the writer process itself."""
SERVER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "MALLOC_ARENA_MAX": "2"}
"""What ``deepfeat serve`` sets before torch loads (scripts/cli.py, ``server_environment``), for the
replica processes Ray starts."""


@dataclass(frozen=True)
class RayServeOptions:
    """What the Ray Serve application needs; pickled to every replica.

    Attributes:
        settings: The service settings (``data_dir`` is the writer's live data dir; replicas never
            open it).
        generations: Where the writer publishes and replicas fetch: a path or URL
            (:class:`deepfeat.index.publish.Location`).
        replicas: Search replicas, or ``None`` to autoscale between ``min_replicas`` and
            ``max_replicas`` on the requests each replica has in flight.
        publish_interval_s: Seconds between publishes (0: only on ``POST /v1/admin/publish``).
        publish_index: IVF factory (``IVF4096,PQ64``) the writer rebuilds before a publish once the
            catalog has moved on by :data:`REBUILD_SHARE`; None publishes whatever generation the data
            dir has (``deepfeat build-index``) or the writer's snapshot.
        cache_dir: Where replicas download publications from a remote location (default: a
            ``deepfeat-generations`` directory in the system temp dir).
        replica_cpus: CPUs Ray reserves per search replica.
        use_gpus: Give each search replica one GPU (None: when the cluster has GPUs and the device
            setting allows).
    """

    settings: Settings
    generations: str
    replicas: int | None = 2
    min_replicas: int = 1
    max_replicas: int = 4
    publish_interval_s: float = 60.0
    publish_index: str | None = None
    cache_dir: Path | None = None
    replica_cpus: float = 1.0
    use_gpus: bool | None = None
    target_ongoing_requests: float = 4.0

    def replica_settings(self, data_dir: Path) -> Settings:
        return self.settings.model_copy(update={"data_dir": data_dir, "read_only": True})

    def download_dir(self) -> Path:
        """This replica's own download directory: ``<cache_dir>/<pid>``.

        Replicas on one host must not share one: each prunes the publications it no longer serves,
        which another replica may still serve. Directories of replicas that are gone (a crash leaves
        one) are removed when a replica starts (:func:`_first_publication`).
        """
        import tempfile

        base = (
            self.cache_dir
            if self.cache_dir is not None
            else Path(tempfile.gettempdir()) / "deepfeat-generations"
        )
        return base / str(os.getpid())


# ============================================================================ in-process ASGI calls


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the writer needs it (headers as latin-1 byte pairs, body whole)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None


@dataclass
class ForwardedResponse:
    status: int = 500
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


async def call_asgi(app: ASGIApp, request: ForwardedRequest) -> ForwardedResponse:
    """Run one request through an ASGI app in this process and collect its response."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("utf-8"),
        "root_path": "",
        "query_string": request.query_string,
        "headers": list(request.headers),
        "client": request.client,
        "server": None,
        "state": {},
    }
    response = ForwardedResponse()
    done = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            response.status = int(message["status"])
            response.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    response.body = b"".join(chunks)
    return response


def _json_response(
    status: int, code: str, detail: str, *, retry_after: int | None = None
) -> ForwardedResponse:
    headers = [(b"content-type", b"application/json")]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    body = json.dumps({"detail": detail, "code": code}).encode("utf-8")
    return ForwardedResponse(status=status, headers=headers, body=body)


async def _send(send: Send, response: ForwardedResponse) -> None:
    headers = [(k, v) for k, v in response.headers if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


# ============================================================================ the writer


class PublishResponse(BaseModel):
    number: int
    generation: int | None
    count: int
    seconds: float


def _admin_router(publish_now: Callable[[], PublishResponse]) -> APIRouter:
    router = APIRouter(prefix="/v1/admin", tags=["admin"])

    @router.post("/publish", response_model=PublishResponse, dependencies=[Depends(require_write)])
    def publish_generation() -> PublishResponse:
        """Publish a generation now: replicas serve it within their refresh interval."""
        return publish_now()

    return router


class Writer:
    """The one writer: the deepfeat app on the live data dir, plus publishing (a Serve deployment)."""

    async def __init__(self, options: RayServeOptions) -> None:  # type: ignore[misc]  # Serve awaits it
        self._options = options
        self._location = Location(options.generations)
        self._publish_lock = threading.Lock()
        self._app = create_app(options.settings.model_copy(update={"read_only": False}))
        self._app.include_router(_admin_router(self._publish_now))
        self._lifespan = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()
        state: AppState = self._app.state.deepfeat
        if state.runtime is None:
            raise RuntimeError(f"the writer is not ready: {state.not_ready_reason}")
        await asyncio.to_thread(self._publish_now)  # replicas start on the store as it is now
        self._publisher: asyncio.Task[None] | None = None
        if options.publish_interval_s > 0:
            self._publisher = asyncio.create_task(self._publish_forever(options.publish_interval_s))

    async def _publish_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self._publish_now)
            except (StoreError, OSError) as exc:
                log.error("publishing a generation failed: %s", exc)

    def _maybe_rebuild(self) -> None:
        factory = self._options.publish_index
        runtime = self._app.state.deepfeat.runtime
        if factory is None or runtime is None:
            return
        manifest = runtime.store.read_manifest(self._options.settings.data_dir)
        current = manifest.generation if manifest is not None else None
        count = runtime.store.count
        if current is not None and abs(count - current.count) <= REBUILD_SHARE * max(current.count, 1):
            return
        try:
            build_generation(
                self._options.settings.data_dir,
                factory=factory,
                max_memory_bytes=process_rss_bytes() + BUILD_BUDGET_BYTES,
            )
        except InvalidArgumentError as exc:  # too few images yet to train it: publish without
            log.info("not building a %s generation yet: %s", factory, exc)

    def _publish_now(self) -> PublishResponse:
        with self._publish_lock:
            started = time.monotonic()
            self._maybe_rebuild()
            pub = publish(self._options.settings.data_dir, self._location, extra_dirs=(CLASSIFIERS_DIR,))
            return PublishResponse(
                number=pub.number,
                generation=pub.files["generation"],
                count=pub.files["count"],
                seconds=round(time.monotonic() - started, 3),
            )

    async def forward(self, request: ForwardedRequest) -> ForwardedResponse:
        """Run a write request forwarded by a replica on the writer's app."""
        return await call_asgi(self._app, request)

    async def publish(self) -> dict[str, Any]:
        """Publish now (for scripts holding a handle; HTTP clients use ``POST /v1/admin/publish``)."""
        return (await asyncio.to_thread(self._publish_now)).model_dump()

    async def __del__(self) -> None:
        """Serve calls this on a graceful shutdown: stop publishing, close the store (snapshot)."""
        if getattr(self, "_publisher", None) is not None:
            self._publisher.cancel()  # type: ignore[union-attr]
        if getattr(self, "_lifespan", None) is not None:
            await self._lifespan.__aexit__(None, None, None)


# ============================================================================ the search replicas


class ForwardWrites:
    """ASGI middleware on a replica: requests the replica refuses as writes go to the writer.

    Which routes write is decided by the app itself: on a replica,
    :func:`deepfeat.app.deps.require_write` answers 403 ``read_only`` before reading the upload.
    This middleware buffers the body of each request that may write (any method but GET, HEAD and
    OPTIONS, up to the upload limit plus one byte: beyond it the app answers 413 from the
    Content-Length, as ``deepfeat serve`` does), lets the replica's app run it, and when the answer
    is that 403, sends the request to the writer through the DeploymentHandle and returns the
    writer's answer instead. Every other answer passes through untouched.
    """

    def __init__(self, app: ASGIApp, *, writer: Any, max_body: int) -> None:
        self.app = app
        self._writer = writer
        self._max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self._max_body or not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        held: list[Message] = []
        refused = False

        async def hold_refusals(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] == 403:
                held.append(message)
                return
            if held and message["type"] == "http.response.body":
                held.append(message)
                if message.get("more_body", False):
                    return
                payload = b"".join(bytes(m.get("body", b"")) for m in held[1:])
                if _error_code(payload) == "read_only":
                    refused = True
                    return
                for kept in held:
                    await send(kept)
                held.clear()
                return
            await send(message)

        await self.app(scope, replay, hold_refusals)
        if refused:
            await _send(send, await self._forward(scope, bytes(body)))

    async def _forward(self, scope: Scope, body: bytes) -> ForwardedResponse:
        client = scope.get("client")
        request = ForwardedRequest(
            method=scope["method"],
            path=scope["path"],
            query_string=scope.get("query_string", b""),
            headers=[(bytes(k), bytes(v)) for k, v in scope.get("headers", [])],
            body=body,
            client=(str(client[0]), int(client[1])) if client else None,
        )
        try:
            response: ForwardedResponse = await asyncio.wait_for(
                self._writer.forward.remote(request), WRITER_TIMEOUT_S
            )
            return response
        except TimeoutError:
            return _json_response(
                503, "writer_unavailable", "the writer did not answer in time; retry", retry_after=5
            )
        except Exception as exc:  # noqa: BLE001 - any Ray failure (actor died, unavailable) is a 503
            log.warning("forwarding %s %s to the writer failed: %s", request.method, request.path, exc)
            return _json_response(
                503, "writer_unavailable", f"the writer is unavailable: {type(exc).__name__}", retry_after=5
            )


def _error_code(payload: bytes) -> str | None:
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


class ServedHeaders:
    """ASGI middleware: every response says which publication and which replica answered
    (``X-Deepfeat-Generation``; ``X-Deepfeat-Replica``: Serve's replica id @ host : pid), so a client
    can tell how fresh an answer is and an operator which process gave it."""

    def __init__(self, app: ASGIApp, *, following: _Following) -> None:
        self.app = app
        self._following = following

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-deepfeat-generation", str(self._following.number).encode()),
                    (b"x-deepfeat-replica", self._following.replica.encode()),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ServeBatcher:
    """Inference's micro-batcher on a replica, made of Ray Serve's ``@serve.batch``.

    Routes are plain ``def`` and run in the replica's worker threads; each image they submit becomes
    one call of a ``@serve.batch`` coroutine on the replica's event loop, which Serve gathers into
    batches of up to ``max_batch`` (waiting at most ``max_wait_s``) and runs one at a time; the forward
    pass itself runs in a thread so the event loop keeps serving. At most ``max_queue`` images wait,
    beyond which :class:`Overloaded` answers 503 ``overloaded`` as in ``deepfeat serve``. Called like
    :class:`deepfeat.models.batching.MicroBatcher` (:class:`deepfeat.app.inference.Inference` takes it).
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        *,
        loop: asyncio.AbstractEventLoop,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        name: str = "batcher",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._loop = loop
        self._slots = threading.BoundedSemaphore(max_queue)
        self.name = name

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_s)
        async def run(items: list[Any]) -> list[Any]:
            if on_batch is not None:
                on_batch(len(items))
            return list(await asyncio.to_thread(fn, items))

        self._run = run

    def submit_many(self, items: Sequence[Any]) -> list[Any]:
        taken = 0
        try:
            for _ in items:
                if not self._slots.acquire(blocking=False):
                    raise Overloaded
                taken += 1
            futures = [asyncio.run_coroutine_threadsafe(self._run(item), self._loop) for item in items]
            return [future.result() for future in futures]
        finally:
            for _ in range(taken):
                self._slots.release()

    def close(self) -> None:
        """Nothing to stop: the batches run on the replica's event loop."""


def _never_on_a_replica() -> PublishResponse:
    raise RuntimeError("require_write refuses publishing on a read-only replica before this runs")


@dataclass
class _Following:
    """The publication a replica serves, and what it refused (by ``LATEST``'s checksum)."""

    number: int
    replica: str
    refused: set[str] = field(default_factory=set)
    retired: list[asyncio.Task[None]] = field(default_factory=list)


def _remove_orphan_downloads(base: Path) -> None:
    """Delete the download directories of replica processes on this host that no longer run."""
    if not base.is_dir():
        return
    for entry in base.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            os.kill(int(entry.name), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


async def _batch_with_serve(state: AppState) -> None:
    """Swap the replica's micro-batcher for one made of ``@serve.batch`` (same limits)."""
    runtime = state.runtime
    if runtime is None or not state.settings.batching:
        return
    old, settings = runtime.inference, state.settings
    runtime.inference = Inference(
        old.embedder,
        runtime.metrics,
        batching=True,
        max_batch=settings.batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
        max_queue=settings.max_queue,
        batcher=functools.partial(ServeBatcher, loop=asyncio.get_running_loop()),
    )
    await asyncio.to_thread(old.close)


async def _first_publication(options: RayServeOptions) -> Publication:
    """Wait for a usable publication (the writer publishes one as it starts)."""
    _remove_orphan_downloads(options.download_dir().parent)
    deadline = time.monotonic() + FIRST_PUBLICATION_TIMEOUT_S
    while True:
        try:
            pub = await asyncio.to_thread(fetch, options.generations, cache_dir=options.download_dir())
            if pub is not None:
                return pub
        except CorruptStoreError as exc:
            log.error("cannot use the latest publication: %s", exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no usable generation published at {options.generations}")
        await asyncio.sleep(0.5)


async def _switch(state: AppState, options: RayServeOptions, following: _Following, pub: Publication) -> None:
    runtime = state.runtime
    if runtime is None:
        return
    settings = options.replica_settings(pub.path)
    store = await asyncio.to_thread(open_store, settings, runtime.inference.embedder, read_only=True)
    old = runtime.store
    runtime.store = store
    runtime.classifiers = ClassifierRegistry(pub.path / CLASSIFIERS_DIR, runtime.inference.embedder)
    runtime.metrics.track_index_size(lambda: store.count)
    previous, following.number = following.number, pub.number
    log.info("now serving published generation %d (%d images), was %d", pub.number, store.count, previous)

    async def retire() -> None:
        await asyncio.sleep(RETIRE_S)
        await asyncio.to_thread(old.close)

    following.retired.append(asyncio.create_task(retire()))


async def _follow(state: AppState, options: RayServeOptions, following: _Following) -> None:
    """Poll ``LATEST``; fetch, verify and switch to each newer publication."""
    interval = options.settings.refresh_interval_s
    while True:
        await asyncio.sleep(interval)
        following.retired = [t for t in following.retired if not t.done()]
        pointer = None
        try:
            pointer = await asyncio.to_thread(latest, options.generations)
            if (
                pointer is None
                or pointer["number"] == following.number
                or pointer["sha256"] in following.refused
            ):
                continue
            pub = await asyncio.to_thread(
                fetch, options.generations, cache_dir=options.download_dir(), current=following.number
            )
            if pub is not None:
                await _switch(state, options, following, pub)
        except CorruptStoreError as exc:
            if pointer is not None:
                following.refused.add(pointer["sha256"])
            log.error("refusing published generation (still serving %d): %s", following.number, exc)
        except (StoreError, OSError) as exc:
            log.warning("cannot fetch the latest generation (still serving %d): %s", following.number, exc)


@serve.ingress()
class Search:
    """A read replica: the deepfeat app on the latest published generation (a Serve deployment)."""

    def __init__(self, options: RayServeOptions, writer: Any) -> None:
        self._options = options
        self._writer = writer

    async def __serve_build_asgi_app__(self) -> FastAPI:
        options = self._options
        pub = await _first_publication(options)
        try:
            name = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (the app on its own)
            name = "local"
        replica = f"{name}@{socket.gethostname()}:{os.getpid()}"
        following = _Following(number=pub.number, replica=replica)
        app = create_app(options.replica_settings(pub.path))
        inner = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with inner(app):
                await _batch_with_serve(app.state.deepfeat)
                follower = asyncio.create_task(_follow(app.state.deepfeat, options, following))
                try:
                    yield
                finally:
                    follower.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await follower
                    for task in following.retired:
                        task.cancel()

        app.router.lifespan_context = lifespan
        # The replica refuses the publish route like any write, so it is forwarded like one.
        app.include_router(_admin_router(_never_on_a_replica))
        app.add_middleware(ForwardWrites, writer=self._writer, max_body=options.settings.max_upload_bytes + 1)
        app.add_middleware(ServedHeaders, following=following)
        return app


# ============================================================================ assembling and running


def _gpus(options: RayServeOptions) -> float:
    if options.use_gpus is not None:
        return 1.0 if options.use_gpus else 0.0
    if options.settings.device == "cpu":
        return 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def build_application(options: RayServeOptions) -> serve.Application:
    """The Serve application (call after ``ray.init``: GPUs are read from the cluster).

    The writer runs on this node (the data dir is here) and reserves no CPU; each search replica
    reserves ``replica_cpus`` (Ray sizes its torch threads to that) and one GPU when the cluster has
    GPUs. With ``replicas=None`` the replicas autoscale on the requests each one
    has in flight (``target_ongoing_requests``).
    """
    env = {"env_vars": dict(SERVER_ENV)}
    # The writer must run where the data dir is: on this node (Ray's built-in "node:<ip>" resource).
    # It reserves no CPU: it is idle between adds, and a node's CPUs are for the search replicas.
    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}
    writer = serve.deployment(
        name="Writer",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "resources": here, "runtime_env": env},
        max_ongoing_requests=64,
    )(Writer)
    scaling: dict[str, Any] = (
        {"num_replicas": options.replicas}
        if options.replicas is not None
        else {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": options.target_ongoing_requests,
            }
        }
    )
    search = serve.deployment(
        name="Search",
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": _gpus(options), "runtime_env": env},
        max_ongoing_requests=max(16, options.settings.max_queue),
        health_check_period_s=5,
        graceful_shutdown_timeout_s=10,
        **scaling,
    )(Search)
    return search.bind(options, writer.bind(options))


def run(options: RayServeOptions, *, address: str | None, host: str, port: int) -> int:
    """Start (or join) a Ray cluster, run the application on ``host:port`` until SIGINT/SIGTERM."""
    if not ray.is_initialized():
        # Without --address a cluster of our own: ray.init(address=None) would silently join any cluster
        # this machine already runs (RAY_ADDRESS, or the last `ray start`), as `deepfeat index` avoids too.
        ray.init(
            address=address or "local", include_dashboard=False, runtime_env={"env_vars": dict(SERVER_ENV)}
        )
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(options), name=APP_NAME, route_prefix="/", blocking=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("deepfeat on Ray Serve at http://%s:%d/ (generations at %s)", host, port, options.generations)
    stop.wait()
    serve.delete(APP_NAME)
    serve.shutdown()
    return 0
