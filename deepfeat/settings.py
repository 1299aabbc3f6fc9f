"""One settings class for the service and the CLI (env prefix ``DEEPFEAT_``; CLI flags override).

Kept free of FastAPI imports so the batch tools can use it without loading the web stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "EMBEDDER_FIELDS"]

EMBEDDER_FIELDS = ("model", "weights", "layer", "pooling", "gem_p", "resize_mode", "max_side", "scales")
"""The settings that decide what a vector means; an existing store's manifest supplies them unless set."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPFEAT_", env_nested_delimiter="__", extra="ignore")

    # --- what makes a vector (recorded in the store's manifest) ---
    data_dir: Path = Field(
        Path("data"), description="Directory holding the catalog, FAISS index and manifest"
    )
    model: str = Field("efficientnet_lite0", description="Model name (`deepfeat models` lists them)")
    weights: str = Field("DEFAULT", description="DEFAULT, a weights enum name, a checkpoint path, or none")
    layer: str | None = Field(None, description="Embedding layer name or its position k from the top")
    pooling: str | None = Field(None, description="avg, max, gem or rmac (conv layers only; default gem)")
    gem_p: float = Field(3.0, gt=0, description="GeM power")
    resize_mode: str = Field("full", description="full (whole image, aspect kept) or crop (centre crop)")
    max_side: int = Field(512, ge=64, le=4096, description="Longest side in full resize mode")
    scales: list[float] = Field(
        default_factory=lambda: [1.0], description="Multi-scale factors, e.g. [1, 0.707]"
    )
    index_factory: str = Field(
        "Flat", description="FAISS factory string for new stores, or auto (by collection size)"
    )

    # --- how it runs ---
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: str = Field(
        "auto",
        description="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16 or fp16",
    )
    compile: bool = Field(False, description="torch.compile the embedding trunk (batch indexing)")
    max_pixels: int = Field(
        40_000_000, gt=0, description="Reject images with more pixels (decompression bombs)"
    )
    min_side: int = Field(8, ge=1, description="Reject images with a shorter side")
    snapshot_every: int = Field(
        1000, ge=1, description="Write the FAISS snapshot after this many added vectors"
    )

    # --- batch indexer ---
    batch_size: int = Field(32, ge=1, le=1024)
    workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Decode worker processes (0 = decode in the main process; default: half the CPUs, "
        "the other half run the model; all but one when the model runs on CUDA)",
    )

    # --- service ---
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(None, description="Required for write routes when set")
    read_api_key: SecretStr | None = Field(None, description="Required for read routes when set")
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Largest request body (the whole multipart upload)"
    )
    max_k: int = Field(100, ge=1, le=10_000)
    body_timeout_s: float | None = Field(
        60.0, gt=0, description="Seconds the whole request body may take; slower uploads get 408"
    )
    cors_origins: list[str] = Field(default_factory=list)
    batching: bool = Field(True, description="Gather concurrent requests into one forward pass")
    batch_max_size: int = Field(16, ge=1, le=256, description="Most images per batched forward pass")
    batch_max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="How long a batch waits for more requests"
    )
    max_queue: int = Field(
        64, ge=1, description="Images allowed to wait for the model; more get 503 overloaded"
    )
    refresh_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often the server picks up other writers' changes (and, read-only, new generations)",
    )
    read_only: bool = Field(
        False,
        description="Serve as a read replica: search the latest published index generation, refuse writes",
    )

    def explicit_embedder_options(self) -> dict[str, Any]:
        """The embedder options the user set (env or flag), as opposed to defaults."""
        return {name: getattr(self, name) for name in EMBEDDER_FIELDS if name in self.model_fields_set}
