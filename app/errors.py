"""Domain errors -> HTTP status + ``{"detail": ..., "code": ...}``, registered in one place.

The codes are part of the API contract: clients branch on ``code``, people read ``detail``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfeat.index import errors as store_errors
from deepfeat.models import errors as model_errors
from deepfeat.models.heads import errors as head_errors

__all__ = [
    "APIError",
    "install_error_handlers",
    "error_response",
    "status_of",
    "STATUS_BY_ERROR",
    "HEADERS_BY_ERROR",
]

log = logging.getLogger(__name__)


class APIError(StarletteHTTPException):
    """An error raised by the HTTP layer itself (auth, readiness, request parameters).

    A Starlette HTTPException subclass, so FastAPI re-raises it untouched even from inside body parsing.
    """

    def __init__(
        self, status_code: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.code = code


# Most specific first: the first isinstance match wins.
STATUS_BY_ERROR: list[tuple[type[Exception], int]] = [
    (model_errors.UnsupportedFormatError, 415),
    (model_errors.ImageError, 422),
    (model_errors.WeightsUnavailableError, 503),
    (model_errors.Overloaded, 503),
    (head_errors.UnknownHeadError, 404),
    (head_errors.InvalidHeadNameError, 404),  # a name that cannot exist is not found either
    (head_errors.IncompatibleHeadError, 409),
    (head_errors.CorruptHeadError, 503),
    (head_errors.NoLabelsError, 422),
    (model_errors.ModelError, 422),
    (store_errors.NotFoundError, 404),
    (store_errors.InvalidVectorError, 422),
    (store_errors.StoreFullError, 507),
    (store_errors.ReadOnlyStoreError, 403),
    (store_errors.ReadOnlyFilesystemError, 503),
    (store_errors.PermissionDeniedError, 503),
    (store_errors.NetworkFilesystemError, 503),
    (store_errors.StoreLockedError, 503),
    (store_errors.IncompatibleIndexError, 409),
    (store_errors.SemanticUnavailableError, 409),
    (store_errors.CorruptStoreError, 503),
    (store_errors.StoreError, 422),
]

HEADERS_BY_ERROR: dict[type[Exception], dict[str, str]] = {
    model_errors.Overloaded: {"Retry-After": "1"},
}

# Server-side (5xx) but not logged per request: a full queue is the expected answer to a burst
# (counted in the metrics), and a refused head was logged once when the registry loaded it.
_NOT_LOGGED: tuple[type[Exception], ...] = (model_errors.Overloaded, head_errors.CorruptHeadError)

_CODE_BY_STATUS = {
    400: "malformed_body",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "not_ready",
}


def status_of(exc: Exception) -> int:
    """The HTTP status a domain error answers with (batch items carry it per item)."""
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    raise exc


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def _count(request: Request, code: str) -> None:
    state = getattr(request.app.state, "deepfeat", None)
    if state is not None:
        state.metrics.errors.labels(code=code).inc()


def _too_many_files(request: Request) -> str:
    """What to do when a body holds more file parts than the route's parser takes: a single-file
    route names its /batch sibling (read from the app's routes), a batch route the server's limit."""
    batch = request.url.path.rstrip("/") + "/batch"
    if any(getattr(route, "path", None) == batch for route in request.app.routes):
        return f"this route takes one file; send several to {batch}"
    state = getattr(request.app.state, "deepfeat", None)
    limit = "" if state is None else f" of {state.settings.max_batch_files}"
    return f"more files than this server's limit{limit} (DEEPFEAT_MAX_BATCH_FILES)"


def install_error_handlers(app: FastAPI) -> None:
    def domain_error(request: Request, exc: Exception) -> JSONResponse:
        code = getattr(exc, "code", "error")
        for cls, status in STATUS_BY_ERROR:
            if isinstance(exc, cls):
                _count(request, code)
                if status >= 500 and not isinstance(exc, _NOT_LOGGED):
                    log.error("%s: %s", code, exc)
                return error_response(status, code, str(exc), headers=HEADERS_BY_ERROR.get(cls))
        raise exc  # pragma: no cover - every registered class is in the table

    for cls in (model_errors.ModelError, store_errors.StoreError):
        app.add_exception_handler(cls, domain_error)

    def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = getattr(exc, "code", None) or _CODE_BY_STATUS.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body could not be parsed as multipart/form-data"
        if exc.status_code == 400 and detail.startswith("Too many files"):  # the multipart parser's cap
            code, detail = "too_many_files", _too_many_files(request)
            _count(request, code)
            return error_response(422, code, detail)
        _count(request, code)
        return error_response(exc.status_code, code, detail, headers=getattr(exc, "headers", None))

    app.add_exception_handler(StarletteHTTPException, http_error)

    def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            message = str(err.get("msg", "invalid"))
            if err.get("type") == "missing" and loc in ("file", "files"):
                message += f" (send the image{'s' if loc == 'files' else ''} as multipart/form-data: -F {loc}=@photo.jpg)"
            parts.append(f"{loc}: {message}" if loc else message)
        _count(request, "invalid_request")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    app.add_exception_handler(RequestValidationError, validation_error)

    def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Called outside the except block: the traceback must be passed, sys.exc_info() is empty here.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        _count(request, "internal_error")
        return error_response(500, "internal_error", "internal error; see the server log")

    app.add_exception_handler(Exception, unexpected)
