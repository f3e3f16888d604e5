"""imagerec classify: every image of a folder, glob or list labelled into a table, unreadable
files as error rows, each output format read back, a SIGKILLed run resumed, and Ray Data."""

from __future__ import annotations

import csv
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagerec.bulk import classify, count_sources, iter_sources
from imagerec.bundle import Bundle, add_to_bundle
from imagerec.cli import main
from imagerec.errors import InvalidInput
from imagerec.images import load_image
from imagerec.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "cifar10"
CIFAR_SMALL = Path(__file__).parent / "fixtures" / "cifar_small"
BAD_FILES = {
    "fake.jpg": "unsupported_media_type",
    "empty.png": "empty_image",
    "cut.jpg": "truncated_image",
    "gone.jpg": "invalid_image",  # a dangling link: the file cannot be read
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """80 CIFAR JPEGs in nested class folders, plus files that cannot be read or decoded and
    one that is not an image by its name (skipped)."""
    root = tmp_path_factory.mktemp("archive") / "photos"
    shutil.copytree(CIFAR_SMALL, root / "2024")
    (root / "fake.jpg").write_text("not a JPEG at all")
    (root / "empty.png").write_bytes(b"")
    jpeg = next(CIFAR_SMALL.glob("cat/*.jpg")).read_bytes()
    (root / "2024" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "gone.jpg").symlink_to(root / "no-such-file.jpg")
    (root / "notes.txt").write_text("a note that sits among the photos")
    return root


def read_table(out: Path) -> list[dict]:
    """The rows of any output format, as the jsonl form has them."""
    if out.suffix == ".parquet":
        return pq.read_table(out).to_pylist()
    if out.suffix == ".jsonl":
        return [json.loads(line) for line in out.read_text().splitlines()]
    rows = []
    with open(out, newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append(
                {
                    "path": row["path"],
                    "label": row["label"] or None,
                    "score": float(row["score"]) if row["score"] else None,
                    "top_k": json.loads(row["top_k"]) if row["top_k"] else None,
                    "error": json.loads(row["error"]) if row["error"] else None,
                    "model": row["model"],
                    "model_version": row["model_version"],
                }
            )
    return rows


def test_every_image_is_labelled_and_unreadable_files_become_error_rows(archive, tmp_path, capsys):
    out = tmp_path / "results.parquet"
    assert main(["classify", str(BUNDLED), str(archive), "--out", str(out), "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 84 rows" in printed and "4 files could not be read or decoded" in printed
    rows = read_table(out)
    by_path = {Path(r["path"]).name if r["error"] else r["path"]: r for r in rows}
    assert len(rows) == len(by_path) == 84  # 80 images and 4 bad files; notes.txt is no image
    for name, code in BAD_FILES.items():
        row = by_path[name]
        assert row["error"]["code"] == code and row["error"]["message"]
        assert row["label"] is None and row["score"] is None and row["top_k"] is None
    good = sorted(r["path"] for r in rows if r["error"] is None)
    assert good == sorted(str(p) for p in archive.glob("2024/*/*.jpg"))
    # The same answers as the predictor gives image by image.
    predictor = Predictor.from_path(BUNDLED, engine="auto")
    expected = predictor.classify([load_image(p) for p in good], k=2)
    for path, want in zip(good, expected, strict=True):
        row = by_path[path]
        assert row["label"] == want.label and row["score"] == pytest.approx(want.score, abs=1e-5)
        assert [t["label"] for t in row["top_k"]] == [label for label, _ in want.top_k]
    # Labels match the class folders for most images (the bundled model was trained on them).
    right = sum(by_path[p]["label"] == Path(p).parent.name for p in good)
    assert right >= 70, right


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_each_output_format_reads_back_as_the_same_table(archive, tmp_path, suffix):
    reference = tmp_path / "reference.jsonl"
    classify(BUNDLED, [str(archive)], reference, progress=False)
    out = tmp_path / f"results{suffix}"
    result = classify(BUNDLED, [str(archive)], out, progress=False, batch_size=16, commit_rows=20)
    assert result.written == 84 and result.errors == 4 and result.skipped == 0
    got, want = read_table(out), read_table(reference)
    assert [r["path"] for r in got] == [r["path"] for r in want]
    version = Bundle.load(BUNDLED, keras_model=False).version
    assert {(r["model"], r["model_version"]) for r in got} == {("cifar10", version)}
    for row, other in zip(got, want, strict=True):
        assert row["label"] == other["label"] and row["error"] == other["error"]
        if row["error"] is None:
            assert row["score"] == pytest.approx(other["score"], abs=1e-6)
            assert row["top_k"][0] == {"label": row["label"], "score": row["score"]}
            assert len(row["top_k"]) == 3
    if suffix == ".parquet":  # a folder of parts that pandas reads as one table
        import pandas as pd

        # Batches of 16, a commit once 20 rows wait: parts of 32, 32 and 20 rows.
        parts = sorted(out.glob("part-*.parquet"))
        assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [32, 32, 20]
        assert len(pd.read_parquet(out)) == 84
    else:
        assert not list(tmp_path.glob(".*progress"))  # the finished run leaves no sidecar


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_an_output_labelled_by_one_model_is_refused_to_another(archive, tmp_path, suffix, capsys):
    retrained = tmp_path / "retrained"
    shutil.copytree(BUNDLED, retrained)
    metrics = json.loads((BUNDLED / "metrics.json").read_text())
    version = add_to_bundle(retrained, {"NOTES.txt": b"retrained"}, metrics)
    cats = archive / "2024" / "cat"
    out = tmp_path / f"results{suffix}"
    assert classify(BUNDLED, [str(cats)], out, progress=False).written == 8
    before = read_table(out)
    # Another model on the same output: nothing of its own is added, however far the first got.
    assert main(["classify", str(retrained), str(archive), "--out", str(out)]) == 1
    first = Bundle.load(BUNDLED, keras_model=False).version
    assert (
        f"{out} holds labels from model cifar10 version {first}, not retrained version {version}"
        in capsys.readouterr().err
    )
    assert read_table(out) == before
    assert not list(tmp_path.glob(".*progress"))
    # The first model carries on where it stopped.
    assert classify(BUNDLED, [str(archive)], out, progress=False).written == 84 - 8


def test_sources_are_folders_globs_images_and_path_lists(archive, tmp_path):
    listed = tmp_path / "list.txt"
    cats = sorted(str(p) for p in archive.glob("2024/cat/*.jpg"))
    listed.write_text("# cats\n" + "\n".join(cats) + "\n\n")
    assert list(iter_sources([listed])) == cats
    dogs = sorted(str(p) for p in archive.glob("2024/dog/*.jpg"))
    assert list(iter_sources([f"{archive}/2024/dog/*.jpg"])) == dogs
    assert list(iter_sources([f"{archive}/**/dog"])) == dogs  # a glob naming a folder
    assert list(iter_sources([dogs[0], listed])) == [dogs[0], *cats]
    walked = list(iter_sources([archive]))
    # A folder's own files (sorted), then its subfolders' (sorted): the same order every time.
    top = [str(archive / n) for n in ("empty.png", "fake.jpg", "gone.jpg", "2024/cut.jpg")]
    assert walked[:4] == top and walked[4:] == sorted(walked[4:]) and len(walked) == 84


def test_a_source_that_is_no_path_list_stops_the_run_with_one_message(archive, tmp_path, capsys):
    binary = tmp_path / "model.onnx"
    binary.write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "r.csv"
    # The progress bar's background count meets it too, and gives up without a word of its own.
    assert count_sources([str(archive), str(binary)], threading.Event()) is None
    assert count_sources([str(archive)], threading.Event()) == 84
    not_a_list = "is neither an image (by its suffix) nor a UTF-8 text file listing paths"
    for engine in ("local", "ray"):  # refused before an output is made or Ray is started
        args = ["classify", str(BUNDLED), str(binary), "--out", str(out), "--engine", engine]
        assert main(args) == 1
        assert not_a_list in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / ".r.csv.progress").exists()
    # Past the first 64 KB, the list is checked as it is read, and the run stops on the same.
    late = tmp_path / "late.txt"
    cat = next(archive.glob("2024/cat/*.jpg"))
    late.write_bytes(f"{cat}\n".encode() + b"# " + b"x" * (1 << 16) + b"\n\xff\xfe\n")
    assert main(["classify", str(BUNDLED), str(late), "--out", str(out)]) == 1
    assert not_a_list in capsys.readouterr().err


def test_each_image_file_is_named_once_however_the_sources_reach_it(archive, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(archive / "2024", tree / "2024")
    (tree / "elsewhere").mkdir()
    shutil.copy(next(CIFAR_SMALL.glob("ship/*.jpg")), tree / "elsewhere" / "ship.jpg")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(next(CIFAR_SMALL.glob("frog/*.jpg")), outside / "frog.jpg")
    (tree / "linked").symlink_to(outside)  # a linked folder is walked like any other
    (tree / "2024" / "up").symlink_to(tree)  # a link back up the tree ends at its first folder
    everything = list(iter_sources([tree]))
    assert len(everything) == len(set(everything)) == 81 + 2  # 2024 holds cut.jpg too
    assert str(tree / "linked" / "frog.jpg") in everything
    dog = sorted(str(p) for p in (tree / "2024" / "dog").glob("*.jpg"))[0]
    for sources in (
        [f"{tree}/**"],  # names every folder of the tree, and every file in it
        [tree, tree / "2024", dog, f"{tree}/2024/dog/*.jpg"],
        [dog, tree],  # a file named first, then its folder
        [f"{tree}/**/*.jpg", f"{tree}/2024/*/*.jpg", tree],
    ):
        named = list(iter_sources(sources))
        assert sorted(named) == sorted(everything), sources
    # End to end: one row an image, as the resume promises.
    out = tmp_path / "once.jsonl"
    result = classify(BUNDLED, [f"{tree}/**", str(tree)], out, progress=False)
    paths = [r["path"] for r in read_table(out)]
    assert result.written == len(paths) == len(set(paths)) == 83


def test_a_folder_that_cannot_be_listed_is_named_in_a_warning(archive, monkeypatch, caplog):
    scandir = os.scandir
    dogs = str(archive / "2024" / "dog")

    def refusing(path="."):
        if os.fspath(path) == dogs:  # as for a folder this user may not read
            raise PermissionError(13, "Permission denied", dogs)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with caplog.at_level("WARNING", logger="imagerec.bulk"):
        named = list(iter_sources([archive]))
    assert len(named) == 84 - 8 and not any("/dog/" in p for p in named)
    assert f"cannot list {dogs} ([Errno 13] Permission denied" in caplog.text
    assert "its images are left out" in caplog.text


def test_a_path_list_on_standard_input_as_find_gives_it(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    ship = next(CIFAR_SMALL.glob("ship/*.jpg"))
    shutil.copy(ship, folder / "ship.jpg")
    shutil.copy(ship, folder / os.fsdecode(b"caf\xe9.jpg"))  # a name that is not UTF-8
    # find's output: the file system's bytes, one name a line.
    listing = b"\n".join(bytes(p) for p in sorted(folder.iterdir())) + b"\n"
    out = tmp_path / "r.csv"
    command = [sys.executable, "-m", "imagerec.cli", "classify", str(BUNDLED), "-"]
    command += ["--out", str(out)]
    run = subprocess.run(command, input=listing, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    assert {r["path"]: r["label"] for r in read_table(out)} == {
        f"{folder}/caf\\xe9.jpg": "ship",
        f"{folder}/ship.jpg": "ship",
    }
    again = subprocess.run(command, input=listing, capture_output=True, timeout=120)
    assert b"2 images were already there and were skipped" in again.stdout
    assert len(read_table(out)) == 2


def test_a_pipe_named_as_a_source_is_a_path_list_and_a_device_an_error_row(archive, tmp_path):
    # What the shell's `imagerec classify BUNDLE <(find ...)` hands the command: a pipe's path.
    # Run in a real shell, so that the pipe is the shell's own and is read once.
    out = tmp_path / "r.csv"
    fifo_image = tmp_path / "fifo.jpg"  # a pipe under an image's name is not read: an error row
    os.mkfifo(fifo_image)
    cli = f"{shlex.quote(sys.executable)} -m imagerec.cli classify {shlex.quote(str(BUNDLED))}"
    line = f"{cli} <(find {shlex.quote(str(archive))}/2024/cat -name '*.jpg') {fifo_image} "
    line += f"/dev/null --out {shlex.quote(str(out))}"
    run = subprocess.run(["bash", "-c", line], capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    rows = read_table(out)
    listed = sorted(str(p) for p in archive.glob("2024/cat/*.jpg"))
    assert sorted(r["path"] for r in rows if not r["error"]) == listed
    errors = {r["path"]: r["error"]["code"] for r in rows if r["error"]}
    assert errors == {str(fifo_image): "invalid_image", "/dev/null": "invalid_image"}
    assert len(rows) == len(listed) + 2


def test_bad_arguments_are_refused_with_a_message(archive, tmp_path, capsys):
    def refused(*args: str) -> str:
        assert main(["classify", str(BUNDLED), *args]) == 1
        return capsys.readouterr().err

    csv_out = str(tmp_path / "r.csv")
    assert "must end in .parquet, .csv, .jsonl" in refused(str(archive), "--out", "r.xlsx")
    assert "no such folder, file or glob" in refused(str(tmp_path / "nope"), "--out", csv_out)
    assert "--top-k must be between 1 and 10" in refused(str(archive), "--out", csv_out, "-k", "11")
    for flag, value in [("--batch-size", "0"), ("--batch-size", "100000")]:
        assert "--batch-size must be between 1 and 4096" in refused(
            str(archive), "--out", csv_out, flag, value
        )
    assert "--commit-every must be at least 1" in refused(
        str(archive), "--out", csv_out, "--commit-every", "0"
    )
    for value in ("-1", "257"):
        assert "--threads must be between 1 and 256" in refused(
            str(archive), "--out", csv_out, "--threads", value
        )
    assert "--ray-actors must be at least 1" in refused(
        str(archive), "--out", csv_out, "--engine", "ray", "--ray-actors", "-2"
    )
    (tmp_path / "taken.parquet").write_text("someone else's file")
    assert "is a file" in refused(str(archive), "--out", str(tmp_path / "taken.parquet"))
    under_a_file = str(tmp_path / "taken.parquet" / "r.csv")
    assert "classify stopped: " in refused(str(archive), "--out", under_a_file)
    for name, text in [("notes.jsonl", '{"note": 1}\n'), ("sheet.csv", "a,b\n1,2\n")]:
        (tmp_path / name).write_text(text)
        assert "is not a table that imagerec classify wrote" in refused(
            str(archive), "--out", str(tmp_path / name)
        )
        assert (tmp_path / name).read_text() == text  # left as it was
        assert not (tmp_path / f".{name}.progress").exists()
    theirs = tmp_path / "theirs.parquet"  # another tool's dataset: nothing is added to it
    theirs.mkdir()
    (theirs / "0_000000_000000.parquet").write_text("another writer's part")
    assert "is a folder that imagerec classify did not write" in refused(
        str(archive), "--out", str(theirs)
    )
    assert [p.name for p in theirs.iterdir()] == ["0_000000_000000.parquet"]
    other = tmp_path / "other.parquet"
    other.mkdir()
    (other / "_imagerec.json").write_text(json.dumps({"name": "x", "version": "0123456789ab"}))
    assert "not cifar10 version" in refused(str(archive), "--out", str(other))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("r.", ".r."))]
    # A finished table given as a SOURCE too: its lines would be labelled as paths into itself.
    table = tmp_path / "done.csv"
    classify(BUNDLED, [str(archive)], table, progress=False)
    before = table.read_bytes()
    assert "is the output (--out) as well" in refused(str(table), "--out", str(table))
    assert table.read_bytes() == before


def test_a_finished_run_run_again_adds_only_new_images(archive, tmp_path):
    out = tmp_path / "results.csv"
    first = classify(BUNDLED, [f"{archive}/2024/cat"], out, progress=False)
    again = classify(BUNDLED, [str(archive)], out, progress=False)
    assert (first.written, again.written, again.skipped) == (8, 76, 8)
    paths = [r["path"] for r in read_table(out)]
    assert len(paths) == len(set(paths)) == 84


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_table_cut_short_outside_classify_is_refused_until_its_torn_row_goes(
    archive, tmp_path, suffix, capsys
):
    out = tmp_path / f"results{suffix}"
    classify(BUNDLED, [str(archive)], out, progress=False)
    whole = out.read_bytes()
    cut = whole[: len(whole) // 2]  # a copy broken off mid-row: no progress record says so
    assert not cut.endswith(b"\n")
    out.write_bytes(cut)
    assert main(["classify", str(BUNDLED), str(archive), "--out", str(out)]) == 1
    assert "ends without a line break, so its last row may be cut short" in capsys.readouterr().err
    assert out.read_bytes() == cut  # left as it was
    out.write_bytes(cut[: cut.rindex(b"\n") + 1])  # the user removes the torn line
    again = classify(BUNDLED, [str(archive)], out, progress=False)
    paths = [r["path"] for r in read_table(out)]
    assert again.written > 0 and len(paths) == len(set(paths)) == 84


def _cut_part(out: Path) -> Path:
    part = next(out.glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:500])
    return part


def _part_without_paths(out: Path) -> Path:
    part = out / "part-000009.parquet"
    pq.write_table(pa.table({"x": [1]}), part)
    return part


def _summary_not_json(out: Path) -> Path:
    (out / "_imagerec.json").write_text('{"name": "cif')
    return out / "_imagerec.json"


def _progress_not_json(out: Path) -> Path:
    progress = out.with_name(f".{out.name}.progress")
    progress.write_text("nope")
    return progress


def _progress_past_the_end(out: Path) -> Path:
    progress = out.with_name(f".{out.name}.progress")
    progress.write_text(json.dumps({"bytes": out.stat().st_size + 1}))
    return progress


@pytest.mark.parametrize(
    "suffix, damage",
    [
        (".parquet", _cut_part),
        (".parquet", _part_without_paths),
        (".parquet", _summary_not_json),
        (".csv", _progress_not_json),
        (".jsonl", _progress_past_the_end),
    ],
)
def test_an_output_damaged_outside_a_run_is_refused_with_a_message_and_left_as_it_was(
    archive, tmp_path, suffix, damage, capsys
):
    out = tmp_path / f"results{suffix}"
    classify(BUNDLED, [f"{archive}/2024/cat"], out, progress=False)
    damaged = damage(out)
    before = damaged.read_bytes()
    assert main(["classify", str(BUNDLED), str(archive), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{damaged} cannot be read as classify wrote it" in err
    assert "Traceback" not in err
    assert damaged.read_bytes() == before


def test_a_csv_row_with_more_or_fewer_fields_than_its_header_is_not_taken_as_ours(
    archive, tmp_path, capsys
):
    out = tmp_path / "results.csv"
    classify(BUNDLED, [str(archive)], out, progress=False)
    header, first, *rest = out.read_bytes().splitlines(keepends=True)
    for row in (b"only,two\r\n", first.rstrip(b"\r\n") + b",extra\r\n"):
        changed = b"".join([header, first, row, *rest])
        out.write_bytes(changed)
        assert main(["classify", str(BUNDLED), str(archive), "--out", str(out)]) == 1
        assert "is not a table that imagerec classify wrote" in capsys.readouterr().err
        assert out.read_bytes() == changed


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_names_that_are_not_utf8_are_written_as_escapes_and_resumed(tmp_path, suffix):
    # Older archives hold Latin-1 names: bytes that no output format can hold as text.
    folder = tmp_path / "latin1"
    folder.mkdir()
    jpeg = next(CIFAR_SMALL.glob("ship/*.jpg")).read_bytes()
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(jpeg)
    (folder / os.fsdecode(b"d\xe9j\xe0-vu.jpg")).symlink_to(folder / "gone.jpg")  # unreadable
    (folder / "plain.jpg").write_bytes(jpeg)
    out = tmp_path / f"results{suffix}"
    result = classify(BUNDLED, [str(folder)], out, progress=False)
    assert (result.written, result.errors) == (3, 1)
    rows = {r["path"]: r for r in read_table(out)}
    good, bad = f"{folder}/caf\\xe9.jpg", f"{folder}/d\\xe9j\\xe0-vu.jpg"
    assert sorted(rows) == sorted([good, bad, f"{folder}/plain.jpg"])
    assert rows[good]["label"] == rows[f"{folder}/plain.jpg"]["label"] == "ship"
    assert rows[bad]["error"]["code"] == "invalid_image"
    assert f"cannot read {bad}" in rows[bad]["error"]["message"]  # the path, escaped as above
    # The same command again finds every name already written, escaped or not.
    again = classify(BUNDLED, [str(folder)], out, progress=False)
    assert (again.written, again.skipped) == (0, 3)


def test_fifos_devices_and_files_too_large_for_an_image_are_error_rows(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    jpeg = next(CIFAR_SMALL.glob("ship/*.jpg")).read_bytes()
    (folder / "ship.jpg").write_bytes(jpeg)
    os.mkfifo(folder / "pipe.jpg")  # opened for reading, it would wait for a writer forever
    (folder / "zero.jpg").symlink_to("/dev/zero")  # read whole, it would never end
    with open(folder / "huge.png", "wb") as handle:  # sparse: 2 GB that take no disk
        handle.truncate(2 << 30)
    # In a child process, so that a run that hangs fails the test instead of stopping it.
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "imagerec.cli", "classify", str(BUNDLED), str(folder)]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {Path(r["path"]).name: r for r in read_table(out)}
    assert rows["ship.jpg"]["error"] is None
    for name in ("pipe.jpg", "zero.jpg"):
        assert rows[name]["error"] == {
            "code": "invalid_image",
            "message": f"{folder / name} is not a regular file",
        }
    assert rows["huge.png"]["error"]["code"] == "payload_too_large"
    assert "2,147,483,648 bytes" in rows["huge.png"]["error"]["message"]


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """2,400 small JPEGs (the fixture's 80, each under 30 names) in 30 folders."""
    root = tmp_path_factory.mktemp("many") / "images"
    sources = sorted(CIFAR_SMALL.glob("*/*.jpg"))
    for copy in range(30):
        folder = root / f"{copy:02d}"
        folder.mkdir(parents=True)
        for i, source in enumerate(sources):
            (folder / f"{i:03d}.jpg").write_bytes(source.read_bytes())
    return root


@pytest.mark.parametrize(
    "suffix, stop",
    [(".parquet", signal.SIGKILL), (".csv", signal.SIGKILL), (".jsonl", signal.SIGINT)],
)
def test_a_run_killed_or_interrupted_resumes_without_duplicates_or_gaps(
    many_images, tmp_path, suffix, stop
):
    out = tmp_path / f"results{suffix}"
    # Small batches and commits, so that the run is killed with many commits behind it and
    # many ahead; one decode thread keeps it slow enough on any machine.
    command = [
        sys.executable, "-m", "imagerec.cli", "classify", str(BUNDLED), str(many_images),
        "--out", str(out), "--batch-size", "8", "--commit-every", "16", "--threads", "1",
    ]  # fmt: skip
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while committed_rows(out) < 160:
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "the run committed nothing in two minutes"
        time.sleep(0.02)
    run.send_signal(stop)
    _, err = run.communicate()
    if stop == signal.SIGKILL:
        assert run.returncode == -signal.SIGKILL
    else:  # Ctrl-C: a message, not a traceback
        assert run.returncode == 130, err
        assert b"interrupted; the rows written to" in err and b"Traceback" not in err
    before = committed_rows(out)
    assert 160 <= before < 2400  # killed part-way

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{before:,} images were already there and were skipped" in resumed.stdout
    rows = read_table(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 2400  # no duplicates, no gaps
    clean = classify(BUNDLED, [str(many_images)], tmp_path / "clean.jsonl", progress=False)
    assert clean.written == 2400
    want = {r["path"]: r["label"] for r in read_table(tmp_path / "clean.jsonl")}
    assert {r["path"]: r["label"] for r in rows} == want


def test_ctrl_c_commits_the_batches_already_classified(archive, tmp_path, monkeypatch):
    import imagerec.bulk

    ranked, seen = imagerec.bulk.ranked_rows, []

    def ranked_then_ctrl_c(*args, **kwargs):
        rows = ranked(*args, **kwargs)
        seen.append(len(rows))
        if len(seen) == 5:  # Ctrl-C, as the terminal sends it, once five batches are done
            os.kill(os.getpid(), signal.SIGINT)
        return rows

    monkeypatch.setattr(imagerec.bulk, "ranked_rows", ranked_then_ctrl_c)
    out = tmp_path / "results.parquet"
    with pytest.raises(KeyboardInterrupt):
        # Commits by count or time would come far later: only the interrupt commits.
        classify(BUNDLED, [str(archive)], out, batch_size=8, threads=1, commit_rows=10_000)
    saved = committed_rows(out)
    assert 8 <= saved <= 8 * len(seen) and saved % 8 == 0, (saved, seen)
    monkeypatch.setattr(imagerec.bulk, "ranked_rows", ranked)
    again = classify(BUNDLED, [str(archive)], out, progress=False)
    assert (again.skipped, again.written) == (saved, 84 - saved)
    paths = [r["path"] for r in read_table(out)]
    assert len(paths) == len(set(paths)) == 84


SIGTERM_AFTER_5_BATCHES = """
import os, signal, sys
import imagerec.bulk
from imagerec.cli import main

ranked, seen = imagerec.bulk.ranked_rows, []

def ranked_then_sigterm(*args, **kwargs):
    rows = ranked(*args, **kwargs)
    seen.append(len(rows))
    if len(seen) == 5:  # as kill, timeout or a container's stop sends it
        os.kill(os.getpid(), signal.SIGTERM)
    return rows

imagerec.bulk.ranked_rows = ranked_then_sigterm
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_commits_the_batches_already_classified_as_ctrl_c_does(archive, tmp_path):
    out = tmp_path / "results.parquet"
    args = ["classify", str(BUNDLED), str(archive), "--out", str(out), "--threads", "1"]
    args += ["--batch-size", "8", "--commit-every", "10000"]  # only the stop commits
    stopped = subprocess.run(
        [sys.executable, "-c", SIGTERM_AFTER_5_BATCHES, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stopped.returncode == 143, stopped.stderr
    assert f"imagerec: stopped (SIGTERM); the rows written to {out} stay there" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    saved = committed_rows(out)
    assert 8 <= saved <= 40 and saved % 8 == 0, saved
    again = classify(BUNDLED, [str(archive)], out, progress=False)
    assert (again.skipped, again.written) == (saved, 84 - saved)


HOLD_OUTPUT = """
import sys, time
from pathlib import Path
from imagerec.bulk import open_sink
from imagerec.bundle import Bundle

bundle = Bundle.load(sys.argv[2], keras_model=False)
sink = open_sink(Path(sys.argv[1]), {"name": bundle.name, "version": bundle.version})
print("holding", flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_second_run_on_an_output_being_written_is_refused(archive, tmp_path, suffix, capsys):
    out = tmp_path / f"results{suffix}"
    # Another run's hold on the output, as its classify takes it when it opens the output.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_OUTPUT, str(out), str(BUNDLED)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"holding\n"
        command = ["classify", str(BUNDLED), str(archive), "--out", str(out)]
        assert main(command) == 1
        assert "is being written by another imagerec classify run" in capsys.readouterr().err
        assert committed_rows(out) == 0
    finally:
        holder.kill()  # as a SIGKILLed run: the kernel lets go of its hold
        holder.wait()
    assert main(command) == 0
    assert len(read_table(out)) == 84


def committed_rows(out: Path) -> int:
    """Rows that a killed run would keep: the committed parts, or the sidecar's length."""
    if out.suffix == ".parquet":
        return sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("part-*.parquet"))
    progress = out.with_name(f".{out.name}.progress")
    try:
        length = json.loads(progress.read_text())["bytes"]
        with open(out, "rb") as handle:
            lines = handle.read(length).count(b"\n")
        return max(0, lines - 1) if out.suffix == ".csv" else lines  # less CSV's header
    except (OSError, ValueError):  # not written yet, or the sidecar caught mid-rename
        return 0


def limit_file_size(size: int):
    """For a child process: files may grow to `size` bytes; a write past that fails (EFBIG),
    as on a full disk, rather than killing the process."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_write_that_fails_stops_the_run_with_a_message_and_the_run_resumes(
    archive, tmp_path, suffix
):
    out = tmp_path / f"results{suffix}"
    command = [
        sys.executable, "-m", "imagerec.cli", "classify", str(BUNDLED), str(archive),
        "--out", str(out), "--batch-size", "8", "--commit-every", "8",
    ]  # fmt: skip
    # A CSV row is about 240 bytes: some commits fit, then one does not. A Parquet part is a
    # file of its own, over 2 kB, so its first commit fails.
    size = 4000 if suffix == ".csv" else 1500
    failed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(size)
    )
    assert failed.returncode == 1, failed.stderr
    assert "imagerec: error: classify stopped:" in failed.stderr
    assert "File too large" in failed.stderr and "Traceback" not in failed.stderr
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # nothing half-written left behind
    kept = committed_rows(out)
    assert (kept > 0) == (suffix == ".csv")
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    paths = [r["path"] for r in read_table(out)]
    assert len(paths) == len(set(paths)) == 84


def test_a_ray_address_where_nothing_answers_fails_at_once_with_a_message(archive, tmp_path):
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    out = tmp_path / "r.parquet"
    command = [sys.executable, "-m", "imagerec.cli", "classify", str(BUNDLED), str(archive)]
    command += ["--out", str(out), "--engine", "ray"]
    # Ray alone retried such an address for over 5 minutes: the timeout fails the test.
    run = subprocess.run(
        command,
        env={**os.environ, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert f"Ray could not start: nothing answers at {address} (RAY_ADDRESS)" in run.stderr
    assert "Traceback" not in run.stderr and committed_rows(out) == 0


def test_without_ray_the_message_says_how_to_install_it(archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    out = tmp_path / "r.parquet"
    assert main(["classify", str(BUNDLED), str(archive), "--out", str(out), "--engine", "ray"]) == 1
    assert "pip install 'imagerec[ray]'" in capsys.readouterr().err
    assert not out.exists()


class FakeRay:
    """Ray's init and is_initialized, recording the environment init was called in."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init(self, **options):
        self.calls.append((options, os.environ.get("RAY_USAGE_STATS_ENABLED")))


@pytest.mark.parametrize(
    ("address", "user_choice", "sent"), [(None, None, "0"), (None, "1", "1"), ("auto", None, None)]
)
def test_a_cluster_started_for_the_command_sends_no_usage_statistics_unless_asked(
    monkeypatch, address, user_choice, sent
):
    """Its own cluster: the dashboard off, and Ray's usage statistics off unless the user's
    environment turns them on; a cluster joined through RAY_ADDRESS is left as its owner set it."""
    from imagerec.bulk_ray import start_ray

    for name, value in (("RAY_ADDRESS", address), ("RAY_USAGE_STATS_ENABLED", user_choice)):
        monkeypatch.setenv(name, value or "")  # so that what start_ray sets is undone after
        if value is None:
            monkeypatch.delenv(name)
    ray = FakeRay()
    assert start_ray(ray) is True
    [(options, seen)] = ray.calls
    assert seen == sent
    assert ("include_dashboard" in options) == (address is None)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of 2 CPUs for this module's Ray tests; skipped only where Ray cannot
    start (never in CI)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - the test extra installs it
        if os.environ.get("CI"):
            raise
        pytest.skip("Ray is not installed: pip install 'imagerec[ray]'")
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    except Exception as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Ray cannot start on this machine: {exc}")
    yield ray
    ray.shutdown()


def test_the_ray_engine_gives_the_local_engines_table(local_ray, archive, tmp_path):
    local = tmp_path / "local.parquet"
    classify(BUNDLED, [str(archive)], local, progress=False)
    out = tmp_path / "ray.parquet"
    result = classify(BUNDLED, [str(archive)], out, engine="ray", batch_size=16)
    assert result.written == 84 and result.errors == 4 and result.engine == "ray/onnx-int8"
    assert sorted(result.error_codes.items()) == sorted(
        {c: list(BAD_FILES.values()).count(c) for c in BAD_FILES.values()}.items()
    )
    got = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    want = {r["path"]: r for r in pq.read_table(local).to_pylist()}
    assert got.keys() == want.keys()
    for path, row in got.items():
        assert row["label"] == want[path]["label"] and row["error"] == want[path]["error"]
        if row["score"] is not None:
            assert np.isclose(row["score"], want[path]["score"], atol=1e-6)
    # Run again: everything is there, nothing is added; a new image is the only new row.
    again = classify(BUNDLED, [str(archive)], out, engine="ray")
    assert (again.written, again.skipped) == (0, 84)
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(next(CIFAR_SMALL.glob("ship/*.jpg")), extra / "ship.jpg")
    shutil.copy(extra / "ship.jpg", extra / os.fsdecode(b"caf\xe9.jpg"))  # not UTF-8
    more = classify(BUNDLED, [str(archive), str(extra)], out, engine="ray")
    assert (more.written, more.skipped) == (2, 84)
    added = {r["path"]: r["label"] for r in pq.read_table(out).to_pylist()[-2:]}
    assert added == {f"{extra}/caf\\xe9.jpg": "ship", f"{extra}/ship.jpg": "ship"}
    # The rows stream back to this process, which writes any of the local engine's formats.
    lines = tmp_path / "ray.jsonl"
    assert classify(BUNDLED, [str(archive)], lines, engine="ray", progress=False).written == 84
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert {r["path"]: (r["label"], r["error"]) for r in records} == {
        p: (r["label"], r["error"]) for p, r in want.items()
    }


def test_the_ray_engine_reads_relative_paths_from_the_commands_folder(
    local_ray, archive, tmp_path, monkeypatch
):
    # The cluster's workers started in another folder, as those of a running cluster do.
    monkeypatch.chdir(archive.parent)
    out = tmp_path / "relative.jsonl"
    result = classify(BUNDLED, ["photos/2024/cat"], out, engine="ray", progress=False)
    rows = read_table(out)
    assert result.errors == 0, rows[0]["error"]
    assert sorted(r["path"] for r in rows) == sorted(
        f"photos/2024/cat/{p.name}" for p in (archive / "2024" / "cat").glob("*.jpg")
    )
    assert all(r["label"] for r in rows)


def test_the_ray_engine_refuses_more_actors_than_the_cluster_holds(local_ray, archive, tmp_path):
    with pytest.raises(InvalidInput, match="ask for fewer --ray-actors or --threads"):
        classify(BUNDLED, [str(archive)], tmp_path / "r.parquet", engine="ray", ray_actors=8)


def test_ctrl_c_on_the_ray_engine_commits_what_came_back_and_stops_the_job(
    local_ray, archive, tmp_path, monkeypatch
):
    import imagerec.bulk_ray

    rows_of, seen = imagerec.bulk_ray.rows_of, []

    def rows_then_ctrl_c(*args, **kwargs):
        rows = rows_of(*args, **kwargs)
        seen.append(len(rows))
        if len(seen) == 2:  # Ctrl-C once two batches have come back
            os.kill(os.getpid(), signal.SIGINT)
        return rows

    monkeypatch.setattr(imagerec.bulk_ray, "rows_of", rows_then_ctrl_c)
    out = tmp_path / "results.parquet"
    with pytest.raises(KeyboardInterrupt):
        classify(BUNDLED, [str(archive)], out, engine="ray", commit_rows=10_000, progress=False)
    saved = committed_rows(out)
    assert saved == seen[0], (saved, seen)  # the first batch; the second was under way
    # The job stopped with the command: its actor gives back the cluster's CPUs.
    deadline = time.monotonic() + 60
    while local_ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert local_ray.available_resources().get("CPU", 0) == 2
    monkeypatch.setattr(imagerec.bulk_ray, "rows_of", rows_of)
    again = classify(BUNDLED, [str(archive)], out, engine="ray", progress=False)
    assert (again.skipped, again.written) == (saved, 84 - saved)
    paths = [r["path"] for r in read_table(out)]
    assert len(paths) == len(set(paths)) == 84
