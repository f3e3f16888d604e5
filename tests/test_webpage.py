"""The web page routes through hug.test: the page and its assets, caching, the model card."""

from __future__ import annotations

import shutil
from importlib import resources

import pytest

from imagerec.api import create_app
from imagerec.config import Settings
from imagerec.hugcompat import hug
from imagerec.predictor import Predictor
from imagerec.repository import ModelRepository

WEB = resources.files("imagerec") / "web"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bundle(card_bundle, tmp_path_factory):
    """A copy of the card bundle with one extra PNG that its manifest does not list."""
    copy = tmp_path_factory.mktemp("web") / card_bundle.name
    shutil.copytree(card_bundle, copy)
    (copy / "unlisted.png").write_bytes(PNG_MAGIC + b"not in the manifest")
    return copy


@pytest.fixture(scope="module")
def api(bundle):
    return create_app(Predictor.from_path(bundle), Settings())


def body_bytes(response) -> bytes:
    data = response.data
    return data.encode() if isinstance(data, str) else data


def error_of(response) -> tuple[int, str]:
    assert set(response.data) == {"error"}, response.data
    return int(response.status[:3]), response.data["error"]["code"]


def test_the_page_and_its_assets_come_from_the_package():
    api = create_app(ModelRepository(), Settings())  # no model yet: the page must still load
    page = hug.test.get(api, "/")
    assert page.status.startswith("200")
    assert page.headers_dict["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers_dict["content-security-policy"]
    html = page.data
    assert html == (WEB / "index.html").read_text()
    for asset, content_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        assert f'"/static/{asset}"' in html
        response = hug.test.get(api, f"/static/{asset}")
        assert response.status.startswith("200"), asset
        assert response.headers_dict["content-type"] == f"{content_type}; charset=utf-8"
        assert body_bytes(response) == (WEB / asset).read_bytes()
    # Nothing is fetched from other hosts: the page must work with no internet.
    assert "http://" not in html and "https://" not in html


def test_the_page_offers_every_way_in_to_people_and_screen_readers():
    html = (WEB / "index.html").read_text()
    assert '<input type="file" id="file-input" accept="image/*" multiple' in html
    assert 'accept="image/*" capture="environment"' in html
    assert 'aria-live="polite"' in html
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html


def test_unknown_static_files_are_json_404s():
    api = create_app(ModelRepository(), Settings())
    for path in ("/static/nope.js", "/static/webpage.py"):
        response = hug.test.get(api, path)
        assert response.headers_dict["content-type"].startswith("application/json"), path
        assert error_of(response) == (404, "not_found"), path
    # A path that leaves the folder matches no route at all: hug's own 404.
    assert hug.test.get(api, "/static/..%2Fwebpage.py").status.startswith("404")


def test_a_client_holding_the_current_file_gets_304():
    api = create_app(ModelRepository(), Settings())
    first = hug.test.get(api, "/static/app.js")
    etag = first.headers_dict["etag"]
    assert first.headers_dict["cache-control"] == "no-cache"
    again = hug.test.get(api, "/static/app.js", headers={"If-None-Match": etag})
    assert again.status.startswith("304")
    stale = hug.test.get(api, "/static/app.js", headers={"If-None-Match": '"old"'})
    assert stale.status.startswith("200")


def test_the_model_card_lists_the_pictures_and_metrics_of_the_served_bundle(api, bundle):
    response = hug.test.get(api, "/v1/model/card")
    assert response.status.startswith("200")
    files = {item["name"]: item for item in response.data["files"]}
    assert set(files) == {
        "confusion.png",
        "training.png",
        "metrics.json",
        "labels.json",
        "preprocess.json",
    }
    assert files["confusion.png"]["title"] == "Confusion matrix"
    served = hug.test.get(api, "/v1/model").data
    query = f"?model={served['name']}&version={served['version']}"
    assert files["training.png"]["url"] == "/v1/model/card/training.png" + query
    assert response.data["model"]["name"] == bundle.name

    for name in ("confusion.png", "training.png"):
        picture = hug.test.get(api, f"/v1/model/card/{name}")
        assert picture.status.startswith("200"), name
        assert picture.headers_dict["content-type"] == "image/png"
        assert body_bytes(picture) == (bundle / name).read_bytes()
        etag = picture.headers_dict["etag"]
        cached = hug.test.get(api, f"/v1/model/card/{name}", headers={"If-None-Match": etag})
        assert cached.status.startswith("304")
    metrics = hug.test.get(api, "/v1/model/card/metrics.json")
    assert metrics.headers_dict["content-type"] == "application/json"


def test_the_card_serves_only_what_the_manifest_lists_and_never_the_weights(api):
    for name in ("model.keras", "unlisted.png", "MANIFEST.sha256", "nothing.png"):
        response = hug.test.get(api, f"/v1/model/card/{name}")
        assert error_of(response) == (404, "not_found"), name


def test_the_card_waits_for_the_model_like_the_other_model_routes():
    api = create_app(ModelRepository(), Settings())
    for path in ("/v1/model/card", "/v1/model/card/confusion.png"):
        assert error_of(hug.test.get(api, path)) == (503, "not_ready")
