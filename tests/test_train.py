"""Training end to end on the committed fixture: the CLI, the bundle it writes, resuming a
killed run, and the bad inputs that must fail cleanly without overwriting anything."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagerec.bundle import Bundle, verify_bundle
from imagerec.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLES = FIXTURES / "samples"
DATA = FIXTURES / "cifar_small"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One short training run on the fixture through the real CLI entry point."""
    out = tmp_path_factory.mktemp("train") / "fixture-model"
    code = main(
        [
            "train",
            "--data",
            str(DATA),
            "--out",
            str(out),
            *["--epochs", "2", "--batch-size", "16", "--seed", "1"],
        ]
    )
    assert code == 0
    return out


def test_train_writes_a_complete_verified_bundle(trained):
    names = {p.name for p in trained.iterdir()}
    expected = "model.keras labels.json preprocess.json metrics.json training.png confusion.png"
    assert {*expected.split(), "MANIFEST.sha256"} <= names
    verify_bundle(trained)
    bundle = Bundle.load(trained)
    assert bundle.labels == sorted(p.name for p in (FIXTURES / "cifar_small").iterdir())
    preprocess = json.loads((trained / "preprocess.json").read_text())
    assert preprocess["input_size"] == [32, 32] and preprocess["tta"] == "flip"
    assert len(preprocess["mean"]) == 3 and all(40 < m < 200 for m in preprocess["mean"])
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["val_count"] == 10
    assert set(metrics["per_class_accuracy"]) == set(bundle.labels)
    assert len(metrics["epoch_times_s"]) == 2
    assert metrics["data"]["train_count"] == 70 and len(metrics["data"]["fingerprint"]) == 64
    assert {"tensorflow", "keras", "numpy", "opencv"} <= set(metrics["versions"])
    assert not list(trained.parent.glob(".fixture-model.*")), "no temp or backup folder is left"
    # The ONNX engines, exported at the end of the run and scored on the same validation split.
    assert {"model.onnx", "model-int8.onnx"} <= names
    engines = metrics["engines"]
    assert set(engines) == {"tensorflow", "onnx", "onnx-int8"}
    for entry in engines.values():
        assert entry["evaluated_on"]["images"] == 10
        assert entry["evaluated_on"]["seen_in_training"] is False
    assert engines["tensorflow"]["accuracy"] == round(metrics["val_accuracy_tta"], 5)
    assert engines["onnx"]["agreement_with_tensorflow"] == 1.0
    for png in ("training.png", "confusion.png"):
        assert (trained / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_prints_accuracy_and_writes_the_confusion_matrix(trained, tmp_path, capsys):
    confusion = tmp_path / "confusion.png"
    code = main(
        ["evaluate", str(trained), "--data", str(DATA), "--confusion", str(confusion)] + ["--json"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 80
    assert 0.0 <= report["accuracy"] <= 1.0
    assert set(report["per_class"]) == set(Bundle.load(trained).labels)
    assert sum(map(sum, report["confusion_matrix"])) == 80
    assert confusion.read_bytes()[:4] == b"\x89PNG"


def test_predict_prints_top_k_per_image_as_json(trained, capsys):
    images = [str(SAMPLES / "cat.jpg"), str(SAMPLES / "ship.jpg")]
    assert main(["predict", str(trained), *images, "--top-k", "4", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["model"]["name"] == "fixture-model"
    assert [r["filename"] for r in answer["results"]] == images
    for result in answer["results"]:
        scores = [t["score"] for t in result["top_k"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert result["label"] == result["top_k"][0]["label"]


def test_predict_reports_a_bad_image_and_exits_non_zero(trained, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    code = main(["predict", str(trained), str(SAMPLES / "cat.jpg"), str(text)])
    captured = capsys.readouterr()
    assert code == 1
    assert "cat.jpg:" in captured.out
    assert "notes.jpg: error: not a supported image" in captured.err


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: root / "missing", "no dataset at"),
        (lambda root: root, "no class folders"),
        (lambda root: _one_class(root), "needs at least 2"),
        (lambda root: _non_images(root), "could be decoded"),
    ],
    ids=["missing-path", "empty-folder", "one-class", "non-images"],
)
def test_bad_datasets_fail_with_a_message_and_leave_the_old_bundle(
    trained, tmp_path, capsys, setup, message
):
    root = tmp_path / "data"
    root.mkdir()
    data = setup(root)
    out = tmp_path / "model"
    shutil.copytree(trained, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = main(["train", "--data", str(data), "--out", str(out), "--epochs", "1"])
    assert code == 1
    assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _one_class(root: Path) -> Path:
    shutil.copytree(FIXTURES / "cifar_small" / "cat", root / "cat")
    return root


def _non_images(root: Path) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir()
        (root / name / "x.jpg").write_text("text, not JPEG")
    return root


def test_output_that_is_not_a_bundle_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not lose me")
    code = main(["train", "--data", str(DATA), "--out", str(out)])
    assert code == 1
    assert "not a model bundle" in capsys.readouterr().err
    assert (out / "thesis.txt").read_text() == "do not lose me"


def test_unwritable_output_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code = main(["train", "--data", str(DATA), "--out", str(blocker / "model")])
    assert code == 1
    assert "cannot create" in capsys.readouterr().err


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "resumable"
    cli = [sys.executable, "-m", "imagerec.cli"]
    command = [
        *cli,
        "train",
        "--data",
        str(DATA),
        "--out",
        str(out),
        *["--epochs", "12", "--batch-size", "8"],
    ]
    checkpoint = tmp_path / ".resumable.backup" / "checkpoint" / "training_metadata.json"
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), "the first epoch wrote a checkpoint"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists(), "a killed run leaves no bundle"

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 1 <= metrics["resumed_at_epoch"] < 12
    assert len(metrics["epoch_times_s"]) == 12, "every epoch is in the history exactly once"
    assert not (tmp_path / ".resumable.backup").exists()


def test_without_a_validation_split_the_fit_on_training_images_is_recorded_as_such(
    tmp_path, capsys
):
    out = tmp_path / "all-images"
    args = ["--epochs", "1", "--batch-size", "16", "--val-split", "0"]
    assert main(["train", "--data", str(DATA), "--out", str(out), *args]) == 0
    assert "no validation split; on 80 of the training images" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_accuracy"] is None and metrics["val_count"] == 0
    assert metrics["data"]["train_count"] == 80 and metrics["train_eval_count"] == 80
    assert 0 <= metrics["train_accuracy"] <= 1 and 0 <= metrics["train_accuracy_tta"] <= 1
    assert sum(map(sum, metrics["confusion_matrix"])) == 80
    assert (out / "confusion.png").read_bytes().startswith(b"\x89PNG")
    verify_bundle(out)


def test_widths_set_the_conv_groups_of_the_saved_model(tmp_path):
    out = tmp_path / "narrow"
    args = ["--epochs", "1", "--batch-size", "16", "--widths", "8,16"]
    assert main(["train", "--data", str(DATA), "--out", str(out), *args]) == 0
    model = Bundle.load(out).model
    convs = {
        layer.name: layer.filters
        for layer in model.layers
        if layer.name.startswith("group") and "_conv" in layer.name
    }
    assert convs == {"group1_conv1": 8, "group1_conv2": 8, "group2_conv1": 16, "group2_conv2": 16}
    assert json.loads((out / "metrics.json").read_text())["config"]["widths"] == [8, 16]


@pytest.mark.parametrize(
    "widths, message",
    [
        ("64,x", "not a comma-separated list of integers"),
        ("64,0,256", "needs one or more positive widths"),
        ("8,8,8,8,8", "5 groups do not fit 32 pixels"),
    ],
)
def test_bad_widths_fail_before_training_with_a_message(tmp_path, capsys, widths, message):
    out = tmp_path / "model"
    try:
        code = main(["train", "--data", str(DATA), "--out", str(out), "--widths", widths])
    except SystemExit as exit:  # argparse's usage error
        code = exit.code
    assert code not in (0, None)
    assert message in capsys.readouterr().err
    assert not out.exists()
