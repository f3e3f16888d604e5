"""The web page for people: `GET /` serves it, `/static/...` its script and style, and
`/v1/model/card/...` the served bundle's pictures and metrics that the page links to.

The page is plain HTML, CSS and JavaScript shipped in the package (imagerec/web/): no build step,
no CDN, so it works on a machine with no internet. Register it with
`create_app(..., routes=DEFAULT_ROUTES + (add_web_routes,))` (DEFAULT_ROUTES includes it).
"""

# No `from __future__ import annotations`: hug reads the annotations as validators and directives.

import hashlib
from importlib import resources
from pathlib import Path
from urllib.parse import urlencode

from imagerec.bundle import MANIFEST
from imagerec.errors import NotFound
from imagerec.hugcompat import falcon, hug

STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The card is for people: pictures and small text files; the weights (model.keras) are not on it.
CARD_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
}
CARD_TITLES = {
    "confusion.png": "Confusion matrix",
    "training.png": "Training curves",
    "metrics.json": "Metrics",
}
# Blob URLs show the thumbnails of the user's own files; nothing is loaded from elsewhere.
PAGE_POLICY = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'"


@hug.format.content_type("application/octet-stream")
def as_sent(data, **_kwargs):
    """hug output format for bytes whose content type the route has already set."""
    return data


def web_files() -> dict[str, bytes]:
    """The page's files by name, read from the package."""
    folder = resources.files("imagerec") / "web"
    return {
        item.name: item.read_bytes()
        for item in folder.iterdir()
        if item.is_file() and Path(item.name).suffix in STATIC_TYPES
    }


def card_files(bundle_path: Path) -> dict[str, str]:
    """Names and sha256 digests of the card files the bundle's manifest lists."""
    files = {}
    for line in (Path(bundle_path) / MANIFEST).read_text().splitlines():
        digest, _, name = line.partition("  ")
        if Path(name).suffix in CARD_TYPES:
            files[name] = digest
    return files


def send(request, response, data: bytes, content_type: str, etag: str) -> bytes:
    """Answer with `data`, or 304 when the client already holds this version."""
    etag = f'"{etag}"'
    response.content_type = content_type
    response.set_header("ETag", etag)
    # Revalidate every time: the files change with the package or the bundle, URLs do not.
    response.set_header("Cache-Control", "no-cache")
    response.set_header("X-Content-Type-Options", "nosniff")
    if etag in (request.get_header("If-None-Match") or ""):
        response.status = falcon.HTTP_304
        return b""
    return data


def add_web_routes(api: hug.API) -> None:
    # Imported here: api.py imports this module for DEFAULT_ROUTES.
    from imagerec.api import invalid_parameters, serving

    # Package files do not change while the server runs: read and digest them once.
    files = {
        name: (data, hashlib.sha256(data).hexdigest()[:20]) for name, data in web_files().items()
    }

    def send_web_file(request, response, name: str) -> bytes:
        if name not in files:
            raise NotFound(f"no static file named {name!r}")
        data, etag = files[name]
        return send(request, response, data, STATIC_TYPES[Path(name).suffix], etag)

    @hug.get("/", api=api, output=as_sent)
    def page(request, response):
        """The web page: drop, pick, paste or photograph images and see their labels."""
        response.set_header("Content-Security-Policy", PAGE_POLICY)
        return send_web_file(request, response, "index.html")

    @hug.get("/static/{name}", api=api, output=as_sent)
    def static(name: str, request, response):
        """The page's script and style sheet."""
        return send_web_file(request, response, name)

    @hug.get("/v1/model/card", api=api, on_invalid=invalid_parameters)
    def card(serving: serving, model: str = None, version: str = None):
        """A served model's card (the default model unless `model` names another): its
        pictures and metrics, with a title and URL each."""
        served = serving.model(model, version)
        bundle = served.bundle
        query = "?" + urlencode({"model": served.name, "version": served.version})
        return {
            "model": {"name": served.name, "version": served.version},
            "files": [
                {
                    "name": name,
                    "title": CARD_TITLES.get(name, name),
                    "url": f"/v1/model/card/{name}{query}",
                    "content_type": CARD_TYPES[Path(name).suffix],
                }
                for name in sorted(card_files(bundle.path))
            ],
        }

    @hug.get("/v1/model/card/{name}", api=api, output=as_sent)
    def card_file(
        name: str, request, response, serving: serving, model: str = None, version: str = None
    ):
        """One file of a served model's card, e.g. confusion.png or training.png."""
        bundle_path = Path(serving.model(model, version).bundle.path)
        digest = card_files(bundle_path).get(name)
        if digest is None:
            raise NotFound(f"the model card has no file named {name!r}")
        data = (bundle_path / name).read_bytes()
        return send(request, response, data, CARD_TYPES[Path(name).suffix], digest[:20])
