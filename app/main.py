"""The FastAPI application: ``create_app(settings)`` builds everything once in the lifespan.

Start-up never crashes on a bad store or missing weights: the app comes up, ``/health`` answers, and
``/ready`` plus every model route answer 503 with the reason, so an orchestrator sees why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse

from deepfeat.app.deps import AppState, Runtime
from deepfeat.app.docs import install_docs
from deepfeat.app.errors import install_error_handlers
from deepfeat.app.inference import Inference
from deepfeat.app.memory import trim_forever
from deepfeat.app.metrics import Metrics, MetricsMiddleware
from deepfeat.app.middleware import BodyLimitMiddleware
from deepfeat.app.routes import batch, classifiers, classify, embed, health, images, search
from deepfeat.classifiers import CLASSIFIERS_DIR, ClassifierRegistry
from deepfeat.index.errors import StoreError, StoreLockedError
from deepfeat.models.embedder import Embedder
from deepfeat.models.errors import ModelError
from deepfeat.runtime import build_embedder, image_limits, open_store
from deepfeat.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _build_embedder(settings: Settings) -> Embedder:
    embedder = build_embedder(settings)
    if embedder.device.type == "cuda":
        # The model runs on the GPU; what is left on the CPU (decode, resize, normalise) runs in the
        # request threads, in parallel. With torch's default of one OpenMP team per calling thread,
        # each as wide as the machine, 8 concurrent requests ran 8 x 16 spinning threads on 16 cores:
        # 1.1 req/s unbatched at 8 clients on an H100 host (README, "Serving").
        torch.set_num_threads(1)
    return embedder


def _runtime_with(settings: Settings, metrics: Metrics, embedder: Embedder) -> Runtime:
    store = open_store(settings, embedder, read_only=settings.read_only)
    metrics.track_index_size(lambda: store.count)
    return Runtime(
        settings=settings,
        metrics=metrics,
        inference=Inference(
            embedder,
            metrics,
            batching=settings.batching,
            max_batch=settings.batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
            max_queue=settings.max_queue,
        ),
        store=store,
        limits=image_limits(settings),
        classifiers=ClassifierRegistry(settings.data_dir / CLASSIFIERS_DIR, embedder),
    )


OPEN_RETRY_S = 5.0
"""Pause between two tries to open a store whose lock another process holds."""


async def _open_when_unlocked(
    state: AppState, settings: Settings, metrics: Metrics, embedder: Embedder
) -> Runtime:
    """Retry opening the store until the process holding its lock lets go (each try waits up to
    ``lock_timeout_s``): a server started beside a stopped writer becomes ready once that writer is
    resumed or ended, without a restart. Until then every route answers 503 with the reason."""
    while True:
        await asyncio.sleep(OPEN_RETRY_S)
        try:
            return await asyncio.to_thread(_runtime_with, settings, metrics, embedder)
        except StoreLockedError as exc:
            state.not_ready_reason = f"{exc.code}: {exc}"
            log.warning("not ready: %s; trying again in %g s", state.not_ready_reason, OPEN_RETRY_S)


async def _refresh_forever(runtime: Runtime, interval: float) -> None:
    """Pick up images added or deleted by other writers (the batch indexer) without a restart, and on
    a read replica a newly published index generation (swapped in while searches go on)."""
    while True:
        await asyncio.sleep(interval)
        try:
            changed = await asyncio.to_thread(runtime.store.refresh)
        except StoreError as exc:
            log.warning("refresh from the catalog failed: %s", exc)
            continue
        if changed:
            log.info("picked up %d changes made by other writers", changed)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state = AppState(settings=settings, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime: Runtime | None = None
        opener: asyncio.Task[Runtime] | None = None
        refresher: asyncio.Task[None] | None = None
        trimmer = asyncio.create_task(trim_forever())

        def serve(ready: Runtime) -> None:
            nonlocal runtime, refresher
            runtime = ready
            state.runtime = ready
            state.not_ready_reason = None
            refresher = asyncio.create_task(_refresh_forever(ready, settings.refresh_interval_s))

        def opened(task: asyncio.Task[Runtime]) -> None:
            if task.cancelled():
                return
            exc = task.exception()
            if exc is None:
                serve(task.result())
                return
            state.not_ready_reason = f"{getattr(exc, 'code', 'error')}: {exc}"
            log.error("not ready: %s", state.not_ready_reason)

        try:
            embedder = await asyncio.to_thread(_build_embedder, settings)
            serve(await asyncio.to_thread(_runtime_with, settings, metrics, embedder))
        except StoreLockedError as exc:  # another process holds the lock: wait for it in the background
            state.not_ready_reason = f"{exc.code}: {exc}"
            log.error("not ready: %s; trying again every %g s", state.not_ready_reason, OPEN_RETRY_S)
            opener = asyncio.create_task(_open_when_unlocked(state, settings, metrics, embedder))
            opener.add_done_callback(opened)
        except (ModelError, StoreError) as exc:
            state.not_ready_reason = f"{exc.code}: {exc}"
            log.error("not ready: %s", state.not_ready_reason)
        try:
            yield
        finally:
            state.runtime = None
            state.not_ready_reason = "shutting down"
            for task in (opener, refresher, trimmer):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if runtime is not None:
                await asyncio.to_thread(runtime.inference.close)
                await asyncio.to_thread(runtime.store.close)

    app = FastAPI(
        title="deepfeat",
        version="0.1.0",
        summary="Search images by image, classify them, and get their deep CNN features.",
        lifespan=lifespan,
        form_limits={"max_files": 1, "max_fields": 8, "max_part_size": 64 * 1024},
        docs_url=None,  # served by install_docs, from local assets
        redoc_url=None,  # ReDoc's script would come from a CDN
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.deepfeat = state
    install_error_handlers(app)
    install_docs(app)
    for module in (batch, search, classify, classifiers, embed, images, health):
        app.include_router(module.router)

    page = resources.files("deepfeat.app").joinpath("web", "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key", "Content-Type"],
        )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        body_timeout_s=settings.body_timeout_s,
        on_error=lambda code: metrics.errors.labels(code=code).inc(),
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
