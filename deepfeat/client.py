"""A Python client for the deepfeat HTTP API, on httpx.

It needs only httpx, not torch or the server's stack, so it runs anywhere a script talks to a
deepfeat service:

>>> from deepfeat import Client
>>> with Client("http://127.0.0.1:8000", api_key="...") as client:
...     added = client.add("cat.jpg", source="cats/1.jpg", metadata={"album": "2024"})
...     hits = client.search("query.jpg", k=5).results
...     more = client.similar(added.id, k=5, min_score=0.5)

Every API error is raised as :class:`DeepfeatAPIError` carrying the API's stable ``code``. A 503
``overloaded`` (or ``not_ready``) answer is retried after its ``Retry-After``, up to ``retries`` times.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

__all__ = [
    "AddResult",
    "BatchItem",
    "Classification",
    "Client",
    "DeepfeatAPIError",
    "Embedding",
    "Hit",
    "ImageInfo",
    "ImagePage",
    "Neighbour",
    "Prediction",
    "SearchResult",
]

Image = str | Path | bytes | IO[bytes]
"""A file path, the file's bytes, or an open binary file."""

_RETRIED_CODES = ("overloaded", "not_ready")


class DeepfeatAPIError(Exception):
    """An error answer of the API: ``status`` (HTTP), ``code`` (stable, for programs), ``detail``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    source: str | None
    metadata: dict[str, Any]
    thumbnail_url: str


@dataclass(frozen=True)
class SearchResult:
    results: list[Hit]
    model: dict[str, Any]
    took_ms: float


@dataclass(frozen=True)
class ImageInfo:
    id: str
    sha256: str
    source: str | None
    width: int | None
    height: int | None
    nbytes: int | None
    metadata: dict[str, Any]
    added_at: float
    thumbnail_url: str
    vector: list[float] | None = None


@dataclass(frozen=True)
class ImagePage:
    items: list[ImageInfo]
    next_cursor: str | None


@dataclass(frozen=True)
class AddResult:
    id: str
    created: bool


@dataclass(frozen=True)
class Prediction:
    label: str
    class_index: int
    probability: float


@dataclass(frozen=True)
class Neighbour:
    """A stored image that voted in a ``knn`` classification."""

    id: str
    score: float
    label: str
    thumbnail_url: str


class Classification(list[Prediction]):
    """The top-k predictions, best first, as a list, with the rest of the answer: ``classifier``
    (the one that answered), ``model``, and for ``knn`` the ``neighbours`` that voted (else None)."""

    def __init__(
        self,
        predictions: list[Prediction],
        *,
        classifier: str,
        model: dict[str, Any],
        neighbours: list[Neighbour] | None,
    ) -> None:
        super().__init__(predictions)
        self.classifier = classifier
        self.model = model
        self.neighbours = neighbours


@dataclass(frozen=True)
class BatchItem:
    """One file of a batch: ``status`` and the single route's ``result`` (2xx), or ``code`` and
    ``detail`` (4xx)."""

    status: int
    result: Any = None
    code: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class Embedding:
    vector: list[float]
    dim: int
    layer: str
    pooling: str
    model: dict[str, Any] = field(default_factory=dict)


def _image_info(data: dict[str, Any]) -> ImageInfo:
    return ImageInfo(**{k: data.get(k) for k in ImageInfo.__dataclass_fields__})  # type: ignore[arg-type]


def _search_result(data: dict[str, Any]) -> SearchResult:
    return SearchResult(
        results=[Hit(**hit) for hit in data["results"]], model=data["model"], took_ms=data["took_ms"]
    )


def _params(**values: Any) -> dict[str, Any]:
    """Query or form fields, without the unset ones; a ``filter`` given as a dict is sent as JSON."""
    if isinstance(values.get("filter"), dict):
        values["filter"] = json.dumps(values["filter"])
    return {k: v for k, v in values.items() if v is not None}


Filter = dict[str, Any] | str | None
"""A metadata filter: a dict (sent as JSON) or its JSON text, e.g. ``{"album": "2024"}``."""


class Client:
    """Args:
    base_url: the service, e.g. ``http://127.0.0.1:8000``.
    api_key: sent as ``X-API-Key`` (the write key also reads).
    timeout: seconds per request.
    retries: times a 503 ``overloaded``/``not_ready`` answer is retried after its ``Retry-After``.
    transport: an httpx transport (tests, proxies).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.retries = retries
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport -------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        *,
        image: Image | None = None,
        images: list[Image] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        if image is not None:
            kwargs["files"] = {"file": ("image", _read(image), "application/octet-stream")}
        if images is not None:
            kwargs["files"] = [
                ("files", (_name(img, n), _read(img), "application/octet-stream"))
                for n, img in enumerate(images)
            ]
        for attempt in range(self.retries + 1):
            response = self._http.request(method, url, **kwargs)
            if response.is_success:
                return response
            error = _error(response)
            if error.code in _RETRIED_CODES and attempt < self.retries:
                time.sleep(_retry_after(response))
                continue
            raise error
        raise AssertionError("unreachable")

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._request(method, url, **kwargs).json()

    # -- search ----------------------------------------------------------------------------------

    def search(
        self,
        image: Image,
        *,
        k: int = 10,
        similarity: str = "visual",
        min_score: float | None = None,
        filter: Filter = None,  # noqa: A002 - the API's name
    ) -> SearchResult:
        """``POST /v1/search``: the indexed images most similar to ``image``, best first (only those
        matching ``filter``)."""
        params = _params(k=k, similarity=similarity, min_score=min_score, filter=filter)
        return _search_result(self._json("POST", "/v1/search", image=image, params=params))

    def similar(
        self,
        image_id: str,
        *,
        k: int = 10,
        similarity: str = "visual",
        min_score: float | None = None,
        filter: Filter = None,  # noqa: A002
    ) -> SearchResult:
        """``GET /v1/images/{id}/similar``: more like an indexed image (itself left out)."""
        params = _params(k=k, similarity=similarity, min_score=min_score, filter=filter)
        return _search_result(self._json("GET", f"/v1/images/{image_id}/similar", params=params))

    def classify(self, image: Image, *, k: int = 5, classifier: str | None = None) -> Classification:
        """``POST /v1/classify``: the top-k classes (ImageNet, ``knn`` or a trained head)."""
        data = self._json("POST", "/v1/classify", image=image, params=_params(k=k, classifier=classifier))
        voters = data.get("neighbours")
        return Classification(
            [Prediction(**p) for p in data["predictions"]],
            classifier=data["classifier"],
            model=data["model"],
            neighbours=None if voters is None else [Neighbour(**n) for n in voters],
        )

    def embed(self, image: Image, *, layer: str | None = None, pooling: str | None = None) -> Embedding:
        """``POST /v1/embed``: the image's features at the store's layer, or another one."""
        data = self._json("POST", "/v1/embed", image=image, params=_params(layer=layer, pooling=pooling))
        return Embedding(
            vector=data["vector"], dim=data["dim"], layer=data["layer"], pooling=data["pooling"],
            model=data.get("model", {}),
        )  # fmt: skip

    # -- batches: one item per image, in order; a bad image fails alone ---------------------------

    def _batch(self, url: str, images: list[Image], **kwargs: Any) -> list[BatchItem]:
        data = self._json("POST", url, images=images, **kwargs)
        return [BatchItem(**item) for item in data["items"]]

    def search_batch(
        self,
        images: list[Image],
        *,
        k: int = 10,
        similarity: str = "visual",
        min_score: float | None = None,
        filter: Filter = None,  # noqa: A002
    ) -> list[BatchItem]:
        """``POST /v1/search/batch``: each item's ``result`` is a /v1/search response (a dict)."""
        params = _params(k=k, similarity=similarity, min_score=min_score, filter=filter)
        return self._batch("/v1/search/batch", images, params=params)

    def embed_batch(
        self, images: list[Image], *, layer: str | None = None, pooling: str | None = None
    ) -> list[BatchItem]:
        """``POST /v1/embed/batch``."""
        return self._batch("/v1/embed/batch", images, params=_params(layer=layer, pooling=pooling))

    def classify_batch(
        self, images: list[Image], *, k: int = 5, classifier: str | None = None
    ) -> list[BatchItem]:
        """``POST /v1/classify/batch``."""
        return self._batch("/v1/classify/batch", images, params=_params(k=k, classifier=classifier))

    def add_batch(self, images: list[Image], *, metadata: dict[str, Any] | None = None) -> list[BatchItem]:
        """``POST /v1/images/batch``: each file's name (a path's) becomes its source."""
        form = _params(metadata=None if metadata is None else json.dumps(metadata))
        return self._batch("/v1/images/batch", images, data=form)

    # -- images ----------------------------------------------------------------------------------

    def add(
        self, image: Image, *, source: str | None = None, metadata: dict[str, Any] | None = None
    ) -> AddResult:
        """``POST /v1/images``: index an image (``created`` False when the content was already there)."""
        form = _params(source=source, metadata=None if metadata is None else json.dumps(metadata))
        return AddResult(**self._json("POST", "/v1/images", image=image, data=form))

    def get(self, image_id: str, *, include_vector: bool = False) -> ImageInfo:
        """``GET /v1/images/{id}``, with its stored vector when asked."""
        params = {"include": "vector"} if include_vector else None
        return _image_info(self._json("GET", f"/v1/images/{image_id}", params=params))

    def thumbnail(self, image_id: str) -> bytes:
        """``GET /v1/images/{id}/thumbnail``: JPEG bytes."""
        return self._request("GET", f"/v1/images/{image_id}/thumbnail").content

    def delete(self, image_id: str) -> None:
        """``DELETE /v1/images/{id}``."""
        self._request("DELETE", f"/v1/images/{image_id}")

    def list_images(
        self,
        *,
        limit: int = 100,
        cursor: str | None = None,
        filter: Filter = None,  # noqa: A002
    ) -> ImagePage:
        """``GET /v1/images``: one page in insertion order (of the images matching ``filter``)."""
        data = self._json("GET", "/v1/images", params=_params(limit=limit, cursor=cursor, filter=filter))
        return ImagePage(items=[_image_info(i) for i in data["items"]], next_cursor=data["next_cursor"])

    def iter_images(self, *, page_size: int = 100, filter: Filter = None) -> Iterator[ImageInfo]:  # noqa: A002
        """Every indexed image (matching ``filter``), page by page (stable while others add and delete)."""
        cursor: str | None = None
        while True:
            page = self.list_images(limit=page_size, cursor=cursor, filter=filter)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # -- service ---------------------------------------------------------------------------------

    def classifiers(self) -> dict[str, Any]:
        """``GET /v1/classifiers``: ``default``, ``classifiers`` and the ``refused`` heads."""
        return dict(self._json("GET", "/v1/classifiers"))

    def stats(self) -> dict[str, Any]:
        """``GET /v1/stats``."""
        return dict(self._json("GET", "/v1/stats"))

    def ready(self) -> dict[str, Any]:
        """``GET /ready``: the readiness report, whether ready (200) or not (503), never retried."""
        response = self._http.get("/ready")
        if response.status_code not in (200, 503):
            raise _error(response)
        return dict(response.json())

    def health(self) -> dict[str, Any]:
        """``GET /health``."""
        return dict(self._json("GET", "/health"))

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self._request("GET", "/metrics").text


def _read(image: Image) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    return image.read()


def _name(image: Image, n: int) -> str:
    """The file name sent with an image (a path's or an open file's; else ``image-N``)."""
    name = str(image) if isinstance(image, str | Path) else getattr(image, "name", None)
    return Path(name).name if isinstance(name, str) and name else f"image-{n}"


def _error(response: httpx.Response) -> DeepfeatAPIError:
    try:
        body = response.json()
        return DeepfeatAPIError(response.status_code, str(body["code"]), str(body["detail"]))
    except (ValueError, KeyError, TypeError):
        return DeepfeatAPIError(response.status_code, "http_error", response.text[:500])


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(30.0, max(0.0, float(response.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0
