"""bundle.py: write atomically, load and verify; refuse tampered, incomplete, unwritable bundles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from imagerec.bundle import MANIFEST, Bundle, Preprocess, verify_bundle, write_bundle
from imagerec.errors import BundleError

LABELS = [f"class{i}" for i in range(10)]
METRICS = {"val_accuracy": 0.5, "epochs": 1}


@pytest.fixture(scope="module")
def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def template(tiny_model, tmp_path_factory) -> Path:
    """One bundle written once per module; tests damage copies of it."""
    out = tmp_path_factory.mktemp("template") / "bundle"
    preprocess = Preprocess((32, 32), mean=[125.3, 123.0, 113.9], std=[63.0, 62.1, 66.7])
    write_bundle(out, tiny_model, LABELS, preprocess, METRICS, {"training.png": b"\x89PNG..."})
    return out


@pytest.fixture
def bundle_copy(template, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(template, copy)
    return copy


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_written_bundle_loads_with_its_contents(template, tiny_model):
    bundle = Bundle.load(template)

    assert bundle.name == "bundle"
    assert bundle.labels == LABELS
    assert bundle.preprocess.input_size == (32, 32)
    assert bundle.preprocess.mean == [125.3, 123.0, 113.9]
    assert bundle.metrics == METRICS
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        bundle.model(images).numpy(), tiny_model(images).numpy(), rtol=1e-5, atol=1e-6
    )
    names = {line.split("  ")[1] for line in (template / MANIFEST).read_text().splitlines()}
    assert names == {
        "model.keras",
        "labels.json",
        "preprocess.json",
        "metrics.json",
        "training.png",
    }


def test_the_version_is_stable_across_loads_and_copies(template, bundle_copy):
    version = verify_bundle(template)
    assert len(version) == 12
    assert verify_bundle(template) == version
    assert verify_bundle(bundle_copy) == version


@pytest.mark.parametrize(
    "name", ["model.keras", "labels.json", "preprocess.json", "metrics.json", "training.png"]
)
def test_tampering_with_any_file_is_refused(bundle_copy, name):
    path = bundle_copy / name
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))
    with pytest.raises(BundleError, match=f"{name} does not match"):
        Bundle.load(bundle_copy)


def test_editing_the_labels_is_refused(bundle_copy):
    (bundle_copy / "labels.json").write_text('["cat", "dog"]\n')
    with pytest.raises(BundleError, match="modified or truncated"):
        verify_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["model.keras", "labels.json", "metrics.json", "training.png"])
def test_a_deleted_file_is_refused(bundle_copy, name):
    (bundle_copy / name).unlink()
    with pytest.raises(BundleError, match=f"{name} is missing"):
        Bundle.load(bundle_copy)


def test_a_truncated_model_is_refused(bundle_copy):
    model = bundle_copy / "model.keras"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(BundleError, match="model.keras does not match"):
        Bundle.load(bundle_copy)


def test_a_missing_manifest_is_refused(bundle_copy):
    (bundle_copy / MANIFEST).unlink()
    with pytest.raises(BundleError, match=f"{MANIFEST} is missing"):
        Bundle.load(bundle_copy)


def test_a_manifest_that_leaves_out_a_required_file_is_refused(bundle_copy):
    manifest = bundle_copy / MANIFEST
    lines = [ln for ln in manifest.read_text().splitlines() if "labels.json" not in ln]
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(BundleError, match="does not list labels.json"):
        Bundle.load(bundle_copy)


def test_a_malformed_manifest_is_refused(bundle_copy):
    (bundle_copy / MANIFEST).write_text("not a manifest\n")
    with pytest.raises(BundleError, match="malformed"):
        Bundle.load(bundle_copy)


def test_a_missing_bundle_folder_is_refused(tmp_path):
    with pytest.raises(BundleError, match="no model bundle"):
        Bundle.load(tmp_path / "nowhere")


class ModelWhoseSaveFails:
    """Writes part of a file, then fails, like a disk filling up mid-save."""

    def save(self, path):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")


def test_a_failed_save_keeps_the_previous_bundle_and_leaves_no_temp_folder(bundle_copy):
    version = verify_bundle(bundle_copy)

    with pytest.raises(BundleError, match="No space left.*the bundle already there is unchanged"):
        write_bundle(bundle_copy, ModelWhoseSaveFails(), ["a", "b"], Preprocess((8, 8)), {})

    assert verify_bundle(bundle_copy) == version
    assert Bundle.load(bundle_copy).labels == LABELS
    assert leftovers(bundle_copy.parent) == []


def test_rewriting_a_bundle_replaces_it_and_leaves_no_temp_folder(bundle_copy, tiny_model):
    labels = [f"new{i}" for i in range(10)]
    write_bundle(bundle_copy, tiny_model, labels, Preprocess((32, 32), tta="flip"), {"epochs": 2})

    bundle = Bundle.load(bundle_copy)
    assert bundle.labels == labels and bundle.preprocess.tta == "flip"
    assert not (bundle_copy / "training.png").exists()  # nothing carried over from the old one
    assert leftovers(bundle_copy.parent) == []


def test_an_out_parent_blocked_by_a_file_is_refused(tmp_path, tiny_model):
    blocker = tmp_path / "models"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(BundleError, match="cannot create"):
        write_bundle(blocker / "cifar10", tiny_model, LABELS, Preprocess((32, 32)), {})
    assert blocker.read_text() == "a file where the folder should be"


def test_an_out_that_is_a_file_is_refused(tmp_path, tiny_model):
    out = tmp_path / "bundle"
    out.write_text("not a folder")
    with pytest.raises(BundleError, match="is not a folder"):
        write_bundle(out, tiny_model, LABELS, Preprocess((32, 32)), {})
    assert out.read_text() == "not a folder"


def test_labels_that_do_not_match_the_model_outputs_are_refused(tmp_path, tiny_model):
    out = write_bundle(tmp_path / "b", tiny_model, ["cat", "dog"], Preprocess((32, 32)), {})
    with pytest.raises(BundleError, match="10 outputs but 2 labels"):
        Bundle.load(out)


def test_an_unknown_tta_mode_is_refused():
    with pytest.raises(BundleError, match="tta"):
        Preprocess.from_dict({"input_size": [32, 32], "tta": "five-crop"})


def test_leftovers_of_a_dead_writer_are_cleaned_up(tmp_path, tiny_model):
    out = tmp_path / "model"
    dead = _dead_pid()
    stale = tmp_path / f".model.tmp-{dead}"
    stale.mkdir()
    (stale / "model.keras").write_bytes(b"half written")
    write_bundle(out, tiny_model, [str(i) for i in range(10)], Preprocess((32, 32)), {})
    assert not stale.exists()
    verify_bundle(out)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
