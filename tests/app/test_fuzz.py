"""Schemathesis against the service's own OpenAPI document: no 5xx, responses match the schema, and only
documented status codes, for generated valid and invalid requests (bounded), then a stateful phase that
chains operations through the links Schemathesis infers (add an image -> get / thumbnail / delete it).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis.core.parameters import ParameterLocation  # noqa: E402
from schemathesis.specs.openapi import checks as oa  # noqa: E402

from deepfeat.app.main import create_app  # noqa: E402
from deepfeat.settings import Settings  # noqa: E402
from tests.app.hostile import encode, variant  # noqa: E402
from tests.app.live import live_server  # noqa: E402

KEY = "fuzz-key"
CHECKS = [
    schemathesis.checks.not_a_server_error,
    oa.status_code_conformance,
    oa.content_type_conformance,
    oa.response_schema_conformance,
    oa.response_headers_conformance,
    oa.negative_data_rejection,
]
EXAMPLES = 25
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce locally
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)


# The OpenAPI document needs no lifespan (no model, no store): build it from a throwaway app at import.
schema = schemathesis.openapi.from_dict(create_app(Settings(data_dir=Path("unused"))).openapi())


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real server (uvicorn on loopback) that the generated requests go to."""
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    with live_server(
        Settings(data_dir=data_dir, api_key=KEY, read_api_key="read-key", max_upload_bytes=256 * 1024)
    ) as base:
        yield base


@schema.parametrize()
@SETTINGS
def test_every_operation(case: Any, base_url: str) -> None:
    with_key(case)
    case.call_and_validate(base_url=base_url, checks=checks_for(case))


BATCH_CHECKS = [check for check in CHECKS if check is not oa.negative_data_rejection]


def checks_for(case: Any) -> list[Any]:
    """A batch route answers a bad file inside its 200, as that file's item (status, code), by
    contract; a "type-violating" file part is only bytes in multipart, so the rejection check cannot
    apply there. tests/app/test_batch.py asserts each bad file's item code instead. Every other check
    still runs on the batch routes."""
    return BATCH_CHECKS if case.path.endswith("/batch") else CHECKS


def with_key(case: Any) -> None:
    """Send the real API key, unless this case is about a bad header (then the mutation must reach the
    server as generated, or a "bad" request would be made good by us)."""
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        return
    if case.path.startswith("/v1/"):  # every /v1 route needs a key here (read_api_key is set)
        case.headers = {**(case.headers or {}), "X-API-Key": KEY}


def test_stateful_links(base_url: str, photos: dict[str, Image.Image]) -> None:
    """Chains POST /v1/images -> GET / thumbnail / DELETE on the id it returned. The uploads carry real
    photos (random bytes would never get a 201, so the chains would never start)."""
    seen: Counter[tuple[str, str, int]] = Counter()
    uploads = itertools.count()
    machine = schema.as_state_machine()

    class Workflow(machine):  # type: ignore[misc,valid-type]
        def before_call(self, case: Any) -> None:
            with_key(case)
            body_ok = case.meta is None or not case.meta.is_negative_at(ParameterLocation.BODY)
            if (
                body_ok
                and case.method == "POST"
                and case.path == "/v1/images"
                and isinstance(case.body, dict)
            ):
                # Every upload is new content, so every add is a 201 whatever ran before: a replayed or
                # shrunk example then meets the same responses (a repeat would be a 200 and change the links).
                n = next(uploads)
                photo = variant(photos["coffee"], n).resize((96, 64))
                for bit in range(24):
                    shade = 255 if (n >> bit) & 1 else 0
                    photo.paste((shade, shade, shade), (4 * bit, 0, 4 * bit + 4, 4))
                case.body = {**case.body, "file": encode(photo, quality=80)}

        def get_call_kwargs(self, case: Any) -> dict[str, object]:
            return {"base_url": base_url}

        def after_call(self, response: Any, case: Any) -> None:
            super().after_call(response, case)
            seen[(case.method, case.path, response.status_code)] += 1

        def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any) -> None:
            # No negative_data_rejection here: stateful steps derive new cases from earlier ones (ours carry
            # a real photo), and a multipart "type mutation" of a text field is valid once serialised.
            # The stateless test above runs that check on every operation.
            case.validate_response(response, checks=CHECKS[:-1], recorder=self.recorder)

    Workflow.run(
        settings=settings(
            max_examples=25,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    # The chains really ran on ids the server handed out.
    assert seen[("POST", "/v1/images", 201)] > 0, seen
    assert seen[("GET", "/v1/images/{image_id}", 200)] + seen[("DELETE", "/v1/images/{image_id}", 200)] > 0, (
        seen
    )
