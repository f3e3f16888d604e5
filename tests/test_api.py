"""Route tests through hug.test: each input form, the model routes, readiness, every error."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import pytest

from imagerec.api import LimitedReader, classify_uploads, create_app
from imagerec.config import Settings
from imagerec.errors import InvalidInput, PayloadTooLarge
from imagerec.hugcompat import FilePart, hug
from imagerec.images import decode_image
from imagerec.predictor import Predictor
from imagerec.repository import ModelRepository
from tiny_bundle import LABELS, SAMPLES, make_tiny_bundle

SETTINGS = Settings(max_body_bytes=200_000, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.from_path(make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny"))


@pytest.fixture(scope="module")
def api(predictor):
    return create_app(predictor, SETTINGS)


def expected(predictor, path, k=3) -> dict:
    prediction = predictor.classify([decode_image(path.read_bytes())], k)[0]
    return {"label": prediction.label, "top_k": [label for label, _ in prediction.top_k]}


def summary(result: dict) -> dict:
    return {"label": result["label"], "top_k": [item["label"] for item in result["top_k"]]}


def multipart(files: list[tuple[str, bytes]], fields: dict | None = None) -> tuple[bytes, dict]:
    boundary = "imagerec-test-boundary"
    body = b""
    for name, value in (fields or {}).items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        body += f"{value}\r\n".encode()
    for filename, data in files:
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that carries no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def error_of(response) -> tuple[int, str]:
    assert set(response.data) == {"error"}, response.data
    return int(response.status[:3]), response.data["error"]["code"]


def test_multipart_images_come_back_in_order_with_their_names(api, predictor):
    files = [(p.name, p.read_bytes()) for p in SAMPLES[:3]]
    body, headers = multipart(files, {"top_k": 2})
    response = hug.test.post(api, "/v1/predict", body=body, headers=headers)
    assert response.status.startswith("200")
    results = response.data["results"]
    assert [r["filename"] for r in results] == [p.name for p in SAMPLES[:3]]
    assert [summary(r) for r in results] == [expected(predictor, p, 2) for p in SAMPLES[:3]]
    assert response.data["model"] == {"name": "tiny", "version": predictor.version}


def test_raw_body_with_top_k_in_the_query(api, predictor):
    path = SAMPLES[3]
    response = hug.test.post(
        api, "/v1/predict", body=path.read_bytes(), headers={"content-type": "image/jpeg"}, top_k=5
    )
    assert response.status.startswith("200")
    [result] = response.data["results"]
    assert summary(result) == expected(predictor, path, 5)
    assert result["score"] == result["top_k"][0]["score"]


def test_json_base64_images_default_to_three_labels(api, predictor):
    images = [
        {"b64": base64.b64encode(SAMPLES[4].read_bytes()).decode(), "filename": "x.jpg"},
        {"b64": "data:image/jpeg;base64," + base64.b64encode(SAMPLES[5].read_bytes()).decode()},
    ]
    response = hug.test.post(api, "/v1/predict", body={"images": images})
    assert response.status.startswith("200")
    results = response.data["results"]
    assert [summary(r) for r in results] == [expected(predictor, p) for p in SAMPLES[4:6]]
    assert [r["filename"] for r in results] == ["x.jpg", None]


def test_model_labels_and_health(api, predictor):
    model = hug.test.get(api, "/v1/model").data
    assert model["labels"] == LABELS and model["input_shape"] == [32, 32, 3]
    assert model["metrics"] == {"val_accuracy": 0.5} and model["version"] == predictor.version
    assert hug.test.get(api, "/v1/labels").data == {"labels": LABELS}
    assert hug.test.get(api, "/healthz").data == {"status": "ok"}
    assert hug.test.get(api, "/readyz").data["status"] == "ready"


def test_metrics_count_requests_and_images(predictor):
    api = create_app(predictor, SETTINGS)
    hug.test.post(
        api, "/v1/predict", body=SAMPLES[0].read_bytes(), headers={"content-type": "image/png"}
    )
    hug.test.post(api, "/v1/predict", body={"images": []})
    text = hug.test.get(api, "/metrics").data
    assert (
        'imagerec_http_requests_total{method="POST",route="/v1/predict",status="200"} 1.0' in text
    )
    assert (
        'imagerec_http_requests_total{method="POST",route="/v1/predict",status="400"} 1.0' in text
    )
    assert "imagerec_images_classified_total 1.0" in text
    assert "imagerec_batch_size_count 1.0" in text
    assert 'imagerec_http_request_duration_seconds_count{route="/v1/predict"} 2.0' in text


def test_not_ready_is_503_until_the_slot_is_filled(predictor):
    slot = ModelRepository()
    api = create_app(slot, SETTINGS)
    assert hug.test.get(api, "/healthz").status.startswith("200")
    assert error_of(hug.test.get(api, "/readyz")) == (503, "not_ready")
    jpeg = {"content-type": "image/jpeg"}
    response = hug.test.post(api, "/v1/predict", body=SAMPLES[0].read_bytes(), headers=jpeg)
    assert error_of(response) == (503, "not_ready")
    slot.fail("the model could not be loaded: broken bundle")
    assert "broken bundle" in hug.test.get(api, "/readyz").data["error"]["message"]
    slot.add(predictor)
    assert hug.test.get(api, "/readyz").status.startswith("200")
    response = hug.test.post(api, "/v1/predict", body=SAMPLES[0].read_bytes(), headers=jpeg)
    assert response.status.startswith("200")


JPEG = SAMPLES[0].read_bytes()
IEND = b"IEND\xaeB`\x82"


def raw(body, content_type: str = "image/jpeg", **params) -> dict:
    return {"body": body, "headers": {"content-type": content_type}, **params}


def as_json(**fields) -> dict:
    return {"body": fields}


ERROR_CASES = {
    "top_k zero": (raw(JPEG, top_k=0), 400),
    "top_k over labels": (as_json(images=[{"b64": "AAAA"}], top_k=11), 400),
    "top_k not a number": (raw(JPEG, top_k="x"), 400),
    "bad base64": (as_json(images=[{"b64": "not base64!"}]), 400),
    "images not a list": (as_json(images="abc"), 400),
    "invalid json": (raw("{not json", "application/json"), 400),
    "no image": (as_json(top_k=2), 400),
    "truncated jpeg": (raw(JPEG[: len(JPEG) // 2]), 400),
    "corrupt png": (raw(png_header_only(4, 4) + IEND, "image/png"), 400),
    "too many pixels": (raw(png_header_only(5000, 5000) + IEND, "image/png"), 413),
    "body over the limit": (raw(b"\xff\xd8\xff" + bytes(SETTINGS.max_body_bytes)), 413),
    "not an image by its bytes": (raw(b"%PDF-1.4 not an image"), 415),
    "declared gif": (raw(b"GIF89a....", "image/gif"), 415),
    "text body": (raw("hello", "text/plain"), 415),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_client_mistakes_get_the_right_status_and_json(api, case):
    kwargs, status = ERROR_CASES[case]
    response = hug.test.post(api, "/v1/predict", **kwargs)
    got_status, code = error_of(response)
    assert got_status == status, response.data
    assert code and response.data["error"]["message"]


def test_one_bad_image_names_itself(api):
    body, headers = multipart([("good.jpg", JPEG), ("bad.jpg", b"\xff\xd8\xff junk")])
    response = hug.test.post(api, "/v1/predict", body=body, headers=headers)
    assert error_of(response)[0] == 400
    assert response.data["error"]["message"].startswith("bad.jpg:")


def test_unknown_route_is_a_404_in_the_error_shape(api):
    """Not hug's own 404 page, which describes the whole API to whoever asks (the API is
    described at /openapi.json, as a client expects)."""
    response = hug.test.get(api, "/no/such/route")
    assert response.status.startswith("404")
    body = json.loads(response.data) if isinstance(response.data, str) else response.data
    assert body == {"error": {"code": "not_found", "message": "no route for GET /no/such/route"}}
    assert "/v1/predict" in hug.test.get(api, "/openapi.json").data["paths"]


class Exploding:
    labels = LABELS
    name, version = "exploding", "0"

    def classify(self, images, k):
        raise RuntimeError("a bug, not the client's fault")


def test_a_server_bug_is_a_json_500():
    api = create_app(Exploding(), SETTINGS)
    response = hug.test.post(api, "/v1/predict", body=JPEG, headers={"content-type": "image/jpeg"})
    assert error_of(response) == (500, "internal_error")
    assert "a bug" not in response.data["error"]["message"]  # internals stay in the log


def test_extra_routes_join_the_same_api(predictor):
    def add_echo_routes(api):
        @hug.get("/v2/echo", api=api)
        def echo(text: hug.types.text):
            """Echo a text back."""
            return {"text": text}

    from imagerec.api import DEFAULT_ROUTES

    api = create_app(predictor, SETTINGS, routes=(*DEFAULT_ROUTES, add_echo_routes))
    assert hug.test.get(api, "/v2/echo", text="hi").data == {"text": "hi"}
    assert hug.test.get(api, "/v1/labels").data == {"labels": LABELS}


def test_classify_uploads_is_callable_without_http(predictor):
    results = classify_uploads(predictor, [FilePart(JPEG, "a.jpg")], 1, 1_000_000)
    assert results[0]["filename"] == "a.jpg" and len(results[0]["top_k"]) == 1


def test_a_body_without_length_is_counted_while_read():
    reader = LimitedReader(io.BytesIO(b"x" * 101), limit=100)
    assert reader.read(60) == b"x" * 60
    with pytest.raises(PayloadTooLarge):
        reader.read()
    assert LimitedReader(io.BytesIO(b"x" * 100), limit=100).read() == b"x" * 100


class Trickle(io.BytesIO):
    """A stream that gives at most 7 bytes a read, as PEP 3333 allows a server's input to."""

    def read(self, size=-1):
        return super().read(7 if size is None or size < 0 else min(size, 7))


def test_a_body_that_ends_before_its_content_length_is_incomplete():
    with pytest.raises(InvalidInput) as raised:
        LimitedReader(io.BytesIO(b"x" * 60), limit=100, length=80).read(80)
    assert raised.value.code == "incomplete_body" and "60 of the 80 bytes" in raised.value.message
    with pytest.raises(InvalidInput):
        LimitedReader(Trickle(b"x" * 60), limit=100, length=80).read()
    # Short reads are not the end: a whole body comes whole, however it trickles in.
    assert LimitedReader(Trickle(b"x" * 80), limit=100, length=80).read(80) == b"x" * 80
    assert LimitedReader(Trickle(b"x" * 80), limit=100, length=80).read() == b"x" * 80


def test_the_accuracy_to_expect_is_that_of_the_answers_as_served():
    from imagerec.api import expected_accuracy
    from imagerec.bundle import Preprocess

    class Bundle:
        def __init__(self, tta, metrics):
            self.preprocess = Preprocess(input_size=(32, 32), tta=tta)
            self.metrics = metrics

    scores = {"val_accuracy": 0.5, "val_accuracy_tta": 0.75}
    assert expected_accuracy(Bundle("flip", scores))["value"] == 0.75  # with TTA, as served
    assert expected_accuracy(Bundle("none", scores))["value"] == 0.5
    estimate = {"value": 0.9, "std": 0.01, "runs": 3, "source": "three seeds"}
    trained_on_all = {"val_accuracy": None, "val_accuracy_tta": None, "accuracy_estimate": estimate}
    assert expected_accuracy(Bundle("flip", trained_on_all)) == {**estimate, "kind": "estimate"}
    assert expected_accuracy(Bundle("flip", {"val_accuracy": None})) is None


def test_the_bundled_model_shows_its_recipes_estimate():
    from imagerec.predictor import Predictor

    bundled = Path(__file__).resolve().parents[1] / "models" / "cifar10"
    api = create_app(Predictor.from_path(bundled, engine="auto"), SETTINGS)
    accuracy = hug.test.get(api, "/v1/model").data["accuracy"]
    assert accuracy["kind"] == "estimate" and accuracy["runs"] == 3
    assert 0.85 < accuracy["value"] < 0.95 and "train_cifar10.md" in accuracy["source"]


def test_a_photo_is_decoded_scaled_and_answered_as_bulk_and_predict_decode_it(
    api, predictor, tmp_path
):
    """A 1024x768 upload for a 32x32 model is decoded at an eighth of its size, on every route
    (native, and the protocols' shared path), as `imagerec classify` and `predict` decode a
    file: the same pixels, so the same scores."""
    import cv2
    import numpy as np

    from imagerec.images import encode_jpeg, jpeg_scale, load_image
    from imagerec.protocols.common import prepare_encoded

    small = decode_image(SAMPLES[0].read_bytes())
    photo = cv2.resize(small, (1024, 768), interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode_jpeg(photo, 85))
    assert jpeg_scale(1024, 768, predictor.input_size) == 8
    pixels = load_image(path, predictor.input_size)
    probs = predictor.predict_arrays(pixels[None])[0]
    response = hug.test.post(
        api, "/v1/predict", body=path.read_bytes(), headers={"content-type": "image/jpeg"}, top_k=3
    )
    assert response.status.startswith("200"), response.data
    [result] = response.data["results"]
    best = np.argsort(-probs)[:3]
    assert [item["label"] for item in result["top_k"]] == [predictor.labels[i] for i in best]
    assert [item["score"] for item in result["top_k"]] == pytest.approx(probs[best], abs=1e-6)
    [prepared] = prepare_encoded(predictor, [path.read_bytes()], SETTINGS.max_pixels)
    assert np.array_equal(prepared, pixels)
