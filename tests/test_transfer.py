"""ImageNet backbones: weight files fetched once through one download path, the fine-tuning
recipe, and Keras' ImageNet classifier as a served bundle.

No real weights can be fetched here, so the tests make their own: files with Keras' real names
and layer shapes (random values, written in the legacy .h5 layout that keras.applications
loads), served by a local HTTP server, with their hashes put in place of the published ones.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import inspect
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from imagerec import pretrained
from imagerec.bundle import Bundle, verify_bundle
from imagerec.cli import main
from imagerec.config import Settings
from imagerec.errors import WeightsUnavailable
from imagerec.pretrained import BACKBONES, KERAS_WEIGHTS_URL

ARCH = "mobilenetv3-small"  # the quickest backbone to build


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


CLASSES = ("blue-squares", "red-discs")


def _photo(rng: np.random.Generator, kind: int, size: tuple[int, int]) -> np.ndarray:
    """An RGB photo of `size` (height, width): a blue square (kind 0) or a red disc on noise."""
    height, width = size
    image = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
    side = int(min(height, width) * rng.uniform(0.3, 0.6))
    y, x = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
    if kind:
        cv2.circle(image, (x + side // 2, y + side // 2), side // 2, (220, 40, 40), -1)
    else:
        cv2.rectangle(image, (x, y), (x + side, y + side), (40, 40, 200), -1)
    return image


def _write_photos(root: Path, per_class: int = 12) -> Path:
    """Two classes of JPEG photos of mixed sizes, in root/<class>/."""
    rng = np.random.default_rng(0)
    for kind, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            image = _photo(rng, kind, tuple(int(n) for n in rng.integers(90, 400, 2)))
            cv2.imwrite(str(root / label / f"{index:03d}.jpg"), image[..., ::-1])  # RGB->BGR
    return root


def _weight_file(arch: str, top: bool) -> bytes:
    """Random weights in the layout of Keras' file for `arch`: legacy .h5, layer by layer.

    Each batch norm's statistics are those of its input on a few test photos, as training
    would leave them, so that activations keep their scale through the network instead of
    fading to a constant (Keras' initial statistics, mean 0 and variance 1, let them fade).
    """
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    spec = BACKBONES[arch]
    keras.utils.set_random_seed(3)
    # Built at 96x96 to be quick: no weight's shape depends on the input size.
    model = getattr(keras.applications, spec.constructor)(
        input_shape=(96, 96, 3), include_top=top, weights=None
    )
    photos = np.stack([_photo(np.random.default_rng(i), i % 2, (96, 96)) for i in range(8)])
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0  # one training-mode pass then leaves each its batch's statistics
    model(photos.astype("float32"), training=True)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    return buffer.getvalue()


def _class_index() -> bytes:
    index = {str(i): [f"n{i:08d}", f"object_{i}"] for i in range(1000)}
    index["517"] = ["n03126707", "crane"]
    index["134"] = ["n02012849", "crane"]  # two classes share a name, as in ImageNet's
    return json.dumps(index).encode()


class _Mirror:
    """A folder served over HTTP on 127.0.0.1, counting the requests it answers."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def put(self, file: pretrained.WeightFile, data: bytes) -> None:
        path = self.root / file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def made_files() -> dict:
    """The test-made weight files and class index, by the name of the file they stand in for."""
    spec = BACKBONES[ARCH]
    return {
        spec.notop.name: _weight_file(ARCH, top=False),
        spec.top.name: _weight_file(ARCH, top=True),
        pretrained.IMAGENET_CLASS_INDEX.name: _class_index(),
    }


@pytest.fixture
def mirror(tmp_path, made_files):
    served = _Mirror(tmp_path / "mirror")
    spec = BACKBONES[ARCH]
    for file in (spec.notop, spec.top, pretrained.IMAGENET_CLASS_INDEX):
        served.put(file, made_files[file.name])
    yield served
    served.close()


@pytest.fixture
def keras_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "keras-home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.fixture
def made_hashes(monkeypatch, made_files):
    """The table's hashes for ARCH and the class index replaced by the test-made files'."""
    spec = BACKBONES[ARCH]
    notop, top, index = (
        dataclasses.replace(file, hash=_md5(made_files[file.name]))
        for file in (spec.notop, spec.top, pretrained.IMAGENET_CLASS_INDEX)
    )
    monkeypatch.setitem(BACKBONES, ARCH, dataclasses.replace(spec, notop=notop, top=top))
    monkeypatch.setattr(pretrained, "IMAGENET_CLASS_INDEX", index)
    return {"notop": notop.hash, "top": top.hash, "index": index.hash}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return _write_photos(tmp_path_factory.mktemp("photos") / "photos")


def _closed_url() -> str:
    from live_server import free_port

    return f"http://127.0.0.1:{free_port()}/"  # nothing listens there: as good as offline


def test_the_table_is_keras_own(monkeypatch):
    """Every file name, URL and hash is the one the installed Keras would fetch and check."""
    import keras
    from keras.src.applications import efficientnet_v2, imagenet_utils, mobilenet_v2, mobilenet_v3

    assert keras.__version__ == pretrained.KERAS_VERSION
    v3 = mobilenet_v3.WEIGHTS_HASHES
    expected = {
        "mobilenetv3-large": (v3["large_224_1.0_float"][1], v3["large_224_1.0_float"][0]),
        "mobilenetv3-small": (v3["small_224_1.0_float"][1], v3["small_224_1.0_float"][0]),
        "efficientnetv2-b0": tuple(reversed(efficientnet_v2.WEIGHTS_HASHES["b0"])),
        "mobilenetv2": (None, None),  # Keras publishes no hash for MobileNetV2's files
    }
    bases = {
        "mobilenetv2": mobilenet_v2.BASE_WEIGHT_PATH,
        "mobilenetv3-large": mobilenet_v3.BASE_WEIGHT_PATH,
        "mobilenetv3-small": mobilenet_v3.BASE_WEIGHT_PATH,
        "efficientnetv2-b0": efficientnet_v2.BASE_WEIGHTS_PATH,
    }
    assert set(BACKBONES) == set(expected)
    for arch, spec in BACKBONES.items():
        assert (spec.notop.hash, spec.top.hash) == expected[arch], arch
        for file in (spec.notop, spec.top):
            assert file.url(KERAS_WEIGHTS_URL) == bases[arch] + file.name
            assert file.hash is None or (len(file.hash) == 32 and int(file.hash, 16) >= 0)
        assert 0.5 < spec.imagenet_top1 < 0.9 and spec.top1_source
    # Keras' own names for the files it would cache.
    assert BACKBONES["mobilenetv3-large"].notop.name == (
        "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"
    )
    assert BACKBONES["efficientnetv2-b0"].top.name == "efficientnetv2-b0.h5"
    index = pretrained.IMAGENET_CLASS_INDEX
    assert index.url(KERAS_WEIGHTS_URL) == imagenet_utils.CLASS_INDEX_PATH
    assert f'file_hash="{index.hash}"' in inspect.getsource(imagenet_utils.decode_predictions)
    assert pretrained.notop_file("mobilenetv2", 160).name.endswith("_1.0_160_no_top.h5")
    assert pretrained.notop_file("mobilenetv2", 64).name.endswith("_1.0_224_no_top.h5")
    monkeypatch.delenv("KERAS_HOME", raising=False)
    assert pretrained.keras_cache_dir() == Path.home() / ".keras" / "models"


def test_first_use_downloads_and_checks_then_the_cache_serves_without_network(
    mirror, keras_home, made_hashes, made_files, capsys
):
    spec = BACKBONES[ARCH]
    weights = pretrained.resolve_weights(ARCH, "imagenet", 224, mirror.url)
    assert weights.path == keras_home / "models" / spec.notop.name
    assert weights.path.read_bytes() == made_files[spec.notop.name]
    assert weights.record == {
        "source": "imagenet",
        "url": mirror.url + spec.notop.path,
        "file": spec.notop.name,
        "md5": made_hashes["notop"],
        "hash_published_by_keras": True,
        "keras_table_version": pretrained.KERAS_VERSION,
    }
    assert mirror.requests == ["/" + spec.notop.path]
    assert spec.notop.name in capsys.readouterr().err  # tqdm's progress bar
    assert [p.name for p in (keras_home / "models").iterdir()] == [spec.notop.name]

    mirror.close()  # the network is gone; the cache answers
    again = pretrained.resolve_weights(ARCH, "imagenet", 224, _closed_url())
    assert again.path == weights.path and again.record["md5"] == made_hashes["notop"]
    assert len(mirror.requests) == 1


def test_a_file_whose_hash_is_not_the_published_one_is_refused(mirror, keras_home):
    spec = BACKBONES[ARCH]  # the real published hash: the test-made file cannot match it
    with pytest.raises(WeightsUnavailable) as error:
        pretrained.resolve_weights(ARCH, "imagenet", 224, mirror.url)
    message = error.value.message
    assert f"{mirror.url}{spec.notop.path} is not the published {spec.notop.name}" in message
    assert spec.notop.hash in message and "nothing was kept" in message
    assert list((keras_home / "models").iterdir()) == []  # no partial file either


def test_offline_names_the_url_the_file_and_where_to_put_it(keras_home):
    spec = BACKBONES["mobilenetv3-large"]
    url = _closed_url()
    with pytest.raises(WeightsUnavailable) as error:
        pretrained.resolve_weights("mobilenetv3-large", "imagenet", 224, url)
    message = error.value.message
    assert f"download {url}{spec.notop.path}" in message
    assert f"place it at {keras_home / 'models' / spec.notop.name}" in message
    assert "--weights none" in message and "IMAGEREC_WEIGHTS_URL" in message
    assert not keras_home.exists()  # nothing written, not even the cache folder


def test_train_without_the_weights_fails_before_reading_or_writing_anything(photos, tmp_path):
    """The real command in a fresh process: one clear line, exit 1, and nothing on disk. Not
    even Keras is imported (it would create $KERAS_HOME and its keras.json)."""
    keras_home, cache = tmp_path / "keras-home", tmp_path / "cache"
    out = tmp_path / "models" / "photos"
    env = {
        **os.environ,
        "KERAS_HOME": str(keras_home),
        "IMAGEREC_CACHE_DIR": str(cache),
        "IMAGEREC_WEIGHTS_URL": _closed_url(),
    }
    command = [sys.executable, "-m", "imagerec.cli", "train", "--data", str(photos)]
    command += ["--arch", "mobilenetv3-large", "--out", str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("imagerec: error: could not download weights_mobilenet_v3_large")
    assert "--weights none" in error and "Traceback" not in run.stderr
    assert not out.parent.exists() and not keras_home.exists() and not cache.exists()


def test_weights_flag_is_checked(photos, tmp_path, capsys):
    code = main(["train", "--data", str(photos), "--out", str(tmp_path / "m"), "--weights", "none"])
    assert code == 1
    assert "--weights (imagenet, none or a weight file) is for the pretrained backbones" in (
        capsys.readouterr().err
    )
    code = main(
        ["train", "--data", str(photos), "--out", str(tmp_path / "m"), "--arch", ARCH]
        + ["--weights", str(tmp_path / "missing.h5")]
    )
    assert code == 1
    assert "missing.h5: no such file" in capsys.readouterr().err


def test_recipe_defaults_follow_the_backbone():
    from imagerec.train import TrainConfig

    config = TrainConfig.for_arch("efficientnetv2-b0", epochs=4)
    assert config.epochs == 4 and config.batch_size == 32
    assert config.resolved_image_size() == (224, 224) and config.resolved_weights() == "imagenet"
    assert TrainConfig.for_arch(ARCH, image_size=160).resolved_image_size() == (160, 160)
    plain = TrainConfig.for_arch(None)
    assert plain.arch == "resnet-small" and plain.batch_size == 1024 and plain.weights is None


def test_photo_augmentation_crops_flips_and_jitters_within_range():
    import tensorflow as tf

    from imagerec.train import augment_photos

    tf.random.set_seed(0)
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    images = np.repeat(ramp[None], 32, axis=0)
    out = augment_photos(images, crop_scale=0.35, jitter=0.0).numpy()
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    rising = out[:, 32, -1, 0] > out[:, 32, 0, 0]
    assert 0 < rising.sum() < 32  # some mirrored, some not
    spans = np.abs(out[:, 32, -1, 0] - out[:, 32, 0, 0])
    assert spans.min() < 0.9 * 252 and spans.max() > 0.55 * 252  # crops of different widths
    coloured = augment_photos(images, crop_scale=1.0, jitter=0.1).numpy()
    assert not np.allclose(coloured.mean(axis=(1, 2, 3)), coloured.mean())


def test_fine_tuning_trains_the_head_then_the_top_of_the_backbone(
    mirror, keras_home, made_hashes, made_files, photos, tmp_path
):
    import keras

    from imagerec.train import TrainConfig, train

    config = TrainConfig.for_arch(
        ARCH, epochs=2, image_size=64, batch_size=8, export_onnx=False, fine_tune_layers=12
    )
    settings = Settings.from_env(weights_url=mirror.url)
    result = train(photos, tmp_path / "photos", config, settings=settings)

    bundle = Bundle.load(result.path)
    assert bundle.labels == list(CLASSES)
    assert bundle.preprocess.input_size == (64, 64)
    backbone = result.metrics["backbone"]
    assert backbone["weights"]["md5"] == made_hashes["notop"]
    assert backbone["weights"]["url"] == mirror.url + BACKBONES[ARCH].notop.path
    first, second = backbone["phases"]
    assert first["epochs"] == [1, 1] and first["backbone_layers_trained"] == 0
    assert second["epochs"] == [2, 2] and second["backbone_layers_trained"] > 0
    assert second["adam_lr"] == config.fine_tune_lr
    saved = json.loads((result.path / "metrics.json").read_text())
    assert saved["backbone"]["weights"] == backbone["weights"]

    # Against the served file: the early layers and every batch norm are ImageNet's still; the
    # top layers moved in the second phase.
    start = keras.applications.MobileNetV3Small(
        input_shape=(64, 64, 3), include_top=False, weights=str(keras_home / "models" /
        BACKBONES[ARCH].notop.name)
    )  # fmt: skip
    tuned = bundle.model.get_layer("backbone")
    layers = [layer for layer in start.layers if layer.weights]
    moved = []
    for theirs in layers:
        ours = tuned.get_layer(theirs.name)
        same = all(
            np.array_equal(a, b)
            for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True)
        )
        moved.append(not same)
        if isinstance(theirs, keras.layers.BatchNormalization):
            assert same, theirs.name
    assert not any(moved[: len(moved) // 2])
    assert any(moved[-6:])
    assert bundle.model.get_layer("logits").get_weights()[0].shape == (576, 2)


def test_import_keras_writes_a_bundle_the_server_answers_with(
    mirror, keras_home, made_hashes, tmp_path, monkeypatch, capsys
):
    from live_server import running_server

    monkeypatch.setenv("IMAGEREC_WEIGHTS_URL", mirror.url)
    out = tmp_path / "imagenet"
    assert main(["import-keras", ARCH, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    verify_bundle(out)
    labels = json.loads((out / "labels.json").read_text())
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert labels[134] == "crane (n02012849)" and labels[517] == "crane (n03126707)"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backbone"]["weights"]["md5"] == made_hashes["top"]
    assert metrics["imagenet_top1_reported"] == BACKBONES[ARCH].imagenet_top1

    photo = np.random.default_rng(1).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", photo)[1].tobytes()
    with running_server(out, tmp_path) as server:
        answer = requests.post(
            server.url + "/v1/predict?top_k=5",
            data=jpeg,
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        result = answer.json()["results"][0]
        assert len(result["top_k"]) == 5 and {t["label"] for t in result["top_k"]} <= set(labels)
        # Open Inference Protocol v2, Triton's classification extension: the same top 3.
        v2 = requests.post(
            server.url + "/v2/models/imagenet/infer",
            json={
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": [base64.b64encode(jpeg).decode()],
                    }
                ],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
            },
            timeout=60,
        )
        assert v2.status_code == 200, v2.text
        ranked = [text.split(":", 2) for text in v2.json()["outputs"][0]["data"]]
        assert [label for _, _, label in ranked] == [t["label"] for t in result["top_k"][:3]]
        assert [labels[int(index)] for _, index, _ in ranked] == [label for *_, label in ranked]
        model = requests.get(server.url + "/v1/model", timeout=10).json()
        assert model["input_shape"] == [224, 224, 3] and len(model["labels"]) == 1000
        assert requests.get(server.url + "/", timeout=10).status_code == 200


def test_import_keras_offline_writes_nothing(tmp_path, keras_home, monkeypatch, capsys):
    monkeypatch.setenv("IMAGEREC_WEIGHTS_URL", _closed_url())
    out = tmp_path / "models" / "imagenet"
    assert main(["import-keras", "efficientnetv2-b0", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("imagerec: error: could not download efficientnetv2-b0.h5")
    assert f"place it at {keras_home / 'models' / 'efficientnetv2-b0.h5'}" in error
    assert "--weights" not in error  # import-keras has no way round it but the file
    assert not out.parent.exists() and not (keras_home / "models").exists()


def test_a_mirror_without_the_file_and_a_weight_file_of_ones_own(
    mirror, keras_home, made_files, tmp_path
):
    spec = BACKBONES["efficientnetv2-b0"]  # the mirror holds only mobilenetv3-small's files
    with pytest.raises(WeightsUnavailable) as error:
        pretrained.resolve_weights("efficientnetv2-b0", "imagenet", 224, mirror.url)
    assert f"{mirror.url}{spec.notop.path} answered 404" in error.value.message
    own = tmp_path / "mine.h5"
    own.write_bytes(made_files[BACKBONES[ARCH].notop.name])
    weights = pretrained.resolve_weights(ARCH, str(own), 224)
    assert weights.path == own and weights.record == {
        "source": "file",
        "path": str(own),
        "sha256": hashlib.sha256(own.read_bytes()).hexdigest(),
    }
    assert not (keras_home / "models").exists()
