"""`imagerec export`: ONNX models added to a bundle atomically, scored, and loadable anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from imagerec.bundle import Bundle, verify_bundle
from imagerec.cli import main
from imagerec.export import Evaluation, export_bundle, whole_batches
from imagerec.images import load_image
from tiny_bundle import SAMPLES, make_tiny_bundle


@pytest.fixture()
def tiny(tmp_path) -> Path:
    return make_tiny_bundle(tmp_path / "tiny")


def _samples() -> np.ndarray:
    return np.stack([load_image(p) for p in SAMPLES])


def test_export_adds_both_models_to_the_manifest_with_their_scores(tiny):
    before = verify_bundle(tiny)
    x = _samples()
    truth = np.arange(len(SAMPLES))  # the samples are named after their classes, in label order
    record = export_bundle(
        tiny, int8=True, calibration=x, evaluation=Evaluation(x, truth, "the samples", False)
    )
    after = verify_bundle(tiny)
    assert after != before
    manifest = (tiny / "MANIFEST.sha256").read_text()
    assert "  model.onnx\n" in manifest and "  model-int8.onnx\n" in manifest
    metrics = json.loads((tiny / "metrics.json").read_text())
    assert metrics["engines"] == record and metrics["val_accuracy"] == 0.5  # the rest is kept
    assert set(record) == {"tensorflow", "onnx", "onnx-int8"}
    assert record["onnx"]["agreement_with_tensorflow"] == 1.0
    assert record["onnx-int8"]["calibration_images"] == len(SAMPLES)
    for entry in record.values():
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["evaluated_on"] == {
            "images": len(SAMPLES),
            "source": "the samples",
            "seen_in_training": False,
            "tta": "flip",
        }


def test_the_exported_models_load_in_a_fresh_process_without_tensorflow(tiny):
    export_bundle(tiny, int8=True, calibration=_samples())
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        import onnxruntime as ort
        shapes = {{}}
        for name in ("model.onnx", "model-int8.onnx"):
            session = ort.InferenceSession({str(tiny)!r} + "/" + name)
            (inp,), (out,) = session.get_inputs(), session.get_outputs()
            probs = session.run(None, {{inp.name: np.zeros((3, 32, 32, 3), np.float32)}})[0]
            shapes[name] = [inp.name, out.name, list(probs.shape)]
        print(json.dumps([shapes, "tensorflow" in sys.modules]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shapes, tensorflow_imported = json.loads(result.stdout)
    for name in ("model.onnx", "model-int8.onnx"):
        assert shapes[name] == ["pixels", "probabilities", [3, 10]]
    assert not tensorflow_imported


def test_a_failed_export_leaves_the_bundle_as_it_was(tiny):
    files = {p.name: p.read_bytes() for p in tiny.iterdir()}
    wrong_size = np.zeros((4, 16, 16, 3), np.uint8)  # calibration images the model cannot take
    with pytest.raises(Exception):  # noqa: B017 (ONNX Runtime's own error type)
        export_bundle(tiny, int8=True, calibration=wrong_size)
    assert {p.name: p.read_bytes() for p in tiny.iterdir()} == files
    assert not list(tiny.parent.glob(".tiny.*"))  # no temporary folder left behind


def test_the_export_command_calibrates_and_scores_on_the_data(tiny, cifar_small, capsys):
    assert main(["export", str(tiny), "--int8", "--data", str(cifar_small)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote model.onnx, model-int8.onnx\n")
    assert "onnx-int8   accuracy" in out and "validation split (0.1, seed 0)" in out
    bundle = Bundle.load(tiny, keras_model=False)
    assert bundle.metrics["engines"]["onnx-int8"]["evaluated_on"]["images"] == 10


def test_the_export_command_refuses_int8_without_data(tiny, capsys):
    assert main(["export", str(tiny), "--int8"]) == 1
    assert "--int8 needs --data" in capsys.readouterr().err
    assert not (tiny / "model.onnx").exists()


def test_calibration_images_are_capped_by_pixels_so_large_photos_fit_in_memory():
    assert len(whole_batches(np.zeros((512, 32, 32, 3), np.uint8))) == 512  # CIFAR's, all
    assert len(whole_batches(np.zeros((600, 32, 32, 3), np.uint8))) == 576  # whole batches
    photos = np.zeros((245, 224, 224, 3), np.uint8)
    assert len(whole_batches(photos)) == 20  # 1,024 images of 32x32 in pixels
    assert len(whole_batches(np.zeros((3, 2000, 2000, 3), np.uint8))) == 1
