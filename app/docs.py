"""The API documentation page, served with its own assets: it renders with no internet access.

FastAPI's default ``/docs`` loads Swagger UI's script and stylesheet from a CDN, so it is blank on an
offline machine. The assets come instead from the ``fastapi-swagger`` wheel (a Swagger UI 5 build,
which reads the OpenAPI 3.1 that FastAPI writes) and are served as static files under ``/docs/assets``;
no page the service serves references an external URL.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["DOCS_URL", "install_docs"]

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs`` from the bundled assets (the app is built with ``docs_url=None``)."""
    from importlib import resources

    assets = resources.files("fastapi_swagger") / "resources"
    app.mount(ASSETS_URL, StaticFiles(directory=str(assets)), name="docs-assets")
    oauth2_redirect = f"{DOCS_URL}/oauth2-redirect"

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            oauth2_redirect_url=oauth2_redirect,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
            # Swagger UI's default validator badge is an image from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
