"""One settings class for the service and the CLI (env prefix ``DEEPFEAT_``; CLI flags override).

The options that define a vector are not declared here: they are :class:`EmbedderFields`, taken in
whole, so their types, choices and defaults live in one place (models/config.py) while keeping flat
names (``DEEPFEAT_SCALES``, ``--scales``). ``Settings.embedder`` gives them back as the config object.
Kept free of FastAPI and torch imports: the CLI builds its flags from this class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from deepfeat.models.config import EmbedderConfig, EmbedderFields, parse_list

__all__ = ["Settings"]


class Settings(BaseSettings, EmbedderFields):
    model_config = SettingsConfigDict(env_prefix="DEEPFEAT_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Field(
        Path("data"), description="Directory holding the catalog, FAISS index and manifest"
    )
    # List settings take "a,b,c" in the environment as on the command line (JSON works too).
    scales: Annotated[tuple[float, ...], NoDecode] = EmbedderFields.model_fields["scales"]  # type: ignore[assignment]
    index_factory: str = Field(
        "Flat", description="FAISS factory string for new stores, or auto (by collection size)"
    )

    # --- how it runs ---
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto (bf16 on CUDA and on CPUs with native bf16, else fp32; where `auto` backend "
        "adopted an engine, that engine's precision), fp32, bf16 or fp16",
    )
    compile: bool = Field(
        False, description="torch.compile the embedding trunk on the torch backend (batch indexing)"
    )
    backend: Literal["auto", "torch", "openvino"] = Field(
        "auto",
        description="What runs the embedding trunk: auto (the faster one measured for this model and "
        "CPU class, else torch), torch, or openvino (CPU only)",
    )
    max_pixels: int = Field(
        40_000_000, gt=0, description="Reject images with more pixels (decompression bombs)"
    )
    min_side: int = Field(8, ge=1, description="Reject images with a shorter side")
    snapshot_every: int = Field(
        1000, ge=1, description="Write the FAISS snapshot after this many added vectors"
    )
    lock_timeout_s: float = Field(
        30.0,
        ge=0,
        description="Seconds a command or the server waits for the store's lock held by another process "
        "(a stopped or hung one) before failing with store_locked",
    )

    # --- batch indexer ---
    batch_size: int = Field(32, ge=1, le=1024, description="Images per forward pass when indexing")
    workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Decode worker processes (0 = decode in threads of the indexing process, the "
        "default on CPU; default with CUDA: all CPUs but one, at most 8)",
    )

    # --- service ---
    host: str = Field("127.0.0.1", description="Address the service binds (0.0.0.0 in the Docker image)")
    port: int = Field(8000, ge=1, le=65535, description="Port the service listens on")
    api_key: SecretStr | None = Field(None, description="Required for write routes when set")
    read_api_key: SecretStr | None = Field(None, description="Required for read routes when set")
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Largest request body (the whole multipart upload)"
    )
    max_k: int = Field(100, ge=1, le=10_000, description="Most results one search may ask for")
    max_batch_files: int = Field(
        32, ge=1, le=256, description="Most images one request to a /batch route may carry"
    )
    body_timeout_s: float | None = Field(
        60.0, gt=0, description="Seconds the whole request body may take; slower uploads get 408"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed to call the API from a browser (CORS)"
    )
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

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_list(cls, value: Any) -> Any:
        return parse_list(value)

    @property
    def embedder(self) -> EmbedderConfig:
        """The options that define a vector, as the config object the Embedder is built from."""
        return EmbedderConfig.model_validate(
            {name: getattr(self, name) for name in EmbedderConfig.model_fields}
        )

    def explicit_embedder_options(self) -> dict[str, Any]:
        """The vector options the user set (environment or flag), as opposed to defaults: these win
        over an existing store's manifest (see :meth:`EmbedderConfig.merged`)."""
        return {
            name: getattr(self, name) for name in EmbedderConfig.model_fields if name in self.model_fields_set
        }
