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
from deepfeat.app.metrics import Metrics, MetricsMiddleware
from deepfeat.app.middleware import BodyLimitMiddleware
from deepfeat.app.routes import batch, classifiers, classify, embed, health, images, search
from deepfeat.classifiers import CLASSIFIERS_DIR, ClassifierRegistry
from deepfeat.index.errors import StoreError
from deepfeat.models.errors import ModelError
from deepfeat.runtime import build_embedder, image_limits, open_store
from deepfeat.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _build_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    embedder = build_embedder(settings)
    if embedder.device.type == "cuda":
        # The model runs on the GPU; what is left on the CPU (decode, resize, normalise) runs in the
        # request threads, in parallel. With torch's default of one OpenMP team per calling thread,
        # each as wide as the machine, 8 concurrent requests ran 8 x 16 spinning threads on 16 cores:
        # 1.1 req/s unbatched at 8 clients on an H100 host (README, "Serving").
        torch.set_num_threads(1)
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
        try:
            runtime = await asyncio.to_thread(_build_runtime, settings, metrics)
        except (ModelError, StoreError) as exc:
            state.not_ready_reason = f"{exc.code}: {exc}"
            log.error("not ready: %s", state.not_ready_reason)
            yield
            return
        state.runtime = runtime
        state.not_ready_reason = None
        refresher = asyncio.create_task(_refresh_forever(runtime, settings.refresh_interval_s))
        try:
            yield
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            state.runtime = None
            state.not_ready_reason = "shutting down"
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
        BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, body_timeout_s=settings.body_timeout_s
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
