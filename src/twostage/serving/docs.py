"""``/docs`` without a CDN: Swagger UI's files come from the ``swagger-ui-bundle-v2``
package and are served by the app itself, so the page works offline (FastAPI's
default page loads them from jsdelivr and is blank without the internet).

ReDoc has no packaged build, so ``/redoc`` is not served.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS", "add_offline_docs"]

#: Where the Swagger UI assets are mounted.
ASSETS = "/static/swagger-ui"


def swagger_ui_directory() -> Path:
    """The packaged Swagger UI build (``swagger-ui-bundle.js``, ``swagger-ui.css``)."""
    from swagger_ui_bundle import swagger_ui_path

    return Path(swagger_ui_path)


def add_offline_docs(app: FastAPI, *, openapi_url: str = "/openapi.json") -> None:
    """Serve ``/docs`` (and its OAuth2 redirect) from the packaged assets."""
    app.mount(ASSETS, StaticFiles(directory=swagger_ui_directory()), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - API docs",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
