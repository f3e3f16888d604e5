"""data.py: CIFAR-10 download and batches, image folders, the array cache, splits, streaming."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

import imagerec.data as data
from imagerec.data import (
    ImageSet,
    StreamingImageSet,
    channel_stats,
    load_cifar10,
    load_dataset,
    load_eval_dataset,
    load_image_folder,
    stratified_split,
)
from imagerec.errors import DatasetError
from imagerec.images import load_image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 20


# A synthetic CIFAR-10 python archive with the official layout


def known_image() -> np.ndarray:
    """32x32 RGB image whose red encodes the row, green the column, blue a constant."""
    rows, cols = np.mgrid[0:32, 0:32]
    return np.dstack([rows * 8, cols * 8, np.full((32, 32), 200)]).astype(np.uint8)


def cifar_row(image: np.ndarray) -> np.ndarray:
    """The CIFAR on-disk row for an HWC RGB image: 1024 R, 1024 G, 1024 B, row-major."""
    return image.transpose(2, 0, 1).reshape(3072)


def make_batches(seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    files = {
        "batches.meta": pickle.dumps(
            {
                b"label_names": [name.encode() for name in CLASSES],
                b"num_cases_per_batch": PER_BATCH,
                b"num_vis": 3072,
            },
            protocol=2,
        )
    }
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(names):
        pixels = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        if number == 0:
            pixels[0] = cifar_row(known_image())
        labels = [(i + number) % 10 for i in range(PER_BATCH)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": pixels,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(PER_BATCH)],
        }
        files[name] = pickle.dumps(batch, protocol=2)
    files["readme.html"] = b"<html>synthetic</html>"
    return files


def make_tarball(files: dict[str, bytes], prefix: str = "cifar-10-batches-py/") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cifar_tarball_bytes() -> bytes:
    return make_tarball(make_batches())


@pytest.fixture
def cifar_tarball(tmp_path: Path, cifar_tarball_bytes: bytes) -> Path:
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(cifar_tarball_bytes)
    return path


class Server:
    """A local HTTP server that serves fixed bytes and records each request path."""

    def __init__(self, routes: dict[str, bytes]):
        self.routes = routes
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802  (http.server's naming)
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(cifar_tarball_bytes: bytes):
    server = Server({"/cifar-10-python.tar.gz": cifar_tarball_bytes})
    yield server
    server.close()


def md5(content: bytes) -> str:
    return hashlib.md5(content).hexdigest()


# CIFAR-10: download, cache, unpickling


def test_download_verifies_md5_and_reuses_the_cached_tarball(server, cifar_tarball_bytes, tmp_path):
    cache = tmp_path / "cache"
    url, digest = server.url("/cifar-10-python.tar.gz"), md5(cifar_tarball_bytes)

    first = load_cifar10(None, "train", cache_dir=cache, url=url, md5=digest)
    second = load_cifar10("cifar10", "train", cache_dir=cache, url=url, md5=digest)

    assert server.requests == ["/cifar-10-python.tar.gz"]  # the second load made no request
    assert (cache / "cifar-10-python.tar.gz").read_bytes() == cifar_tarball_bytes
    assert not list(cache.glob("*.part"))
    assert len(first) == 5 * PER_BATCH and first.class_names == CLASSES
    assert first.fingerprint == second.fingerprint


def test_download_with_the_wrong_md5_is_rejected_and_nothing_is_kept(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="md5"):
        load_cifar10(None, cache_dir=cache, url=server.url("/cifar-10-python.tar.gz"), md5="0" * 32)
    assert list(cache.iterdir()) == []


def test_a_corrupt_cached_tarball_is_downloaded_again(server, cifar_tarball_bytes, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cifar-10-python.tar.gz").write_bytes(cifar_tarball_bytes[:1000])
    url, digest = server.url("/cifar-10-python.tar.gz"), md5(cifar_tarball_bytes)

    dataset = load_cifar10(None, cache_dir=cache, url=url, md5=digest)

    assert len(server.requests) == 1
    assert len(dataset) == 5 * PER_BATCH


def test_download_reports_an_http_error_as_a_dataset_error(server, tmp_path):
    with pytest.raises(DatasetError, match="could not download"):
        data.download(server.url("/missing.tar.gz"), tmp_path / "x.tar.gz", "0" * 32)
    assert not (tmp_path / "x.tar.gz").exists()
    assert not (tmp_path / "x.tar.gz.part").exists()


class RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


@pytest.mark.parametrize("make_payload", ["os.system", "builtins.eval"])
def test_a_malicious_pickle_is_refused_and_never_runs(make_payload, tmp_path):
    marker = tmp_path / "pwned"
    evil = RunsShell(f"touch {marker}") if make_payload == "os.system" else CallsEval()
    files = make_batches()
    files["data_batch_1"] = pickle.dumps({b"data": evil, b"labels": [0]}, protocol=2)
    tarball = tmp_path / "evil.tar.gz"
    tarball.write_bytes(make_tarball(files))

    with pytest.raises(DatasetError, match="refusing"):
        load_cifar10(tarball)
    assert not marker.exists()


def test_tarball_path_and_extracted_folders_give_the_same_images(cifar_tarball, tmp_path):
    from_tarball = load_cifar10(cifar_tarball, "train")
    extracted = tmp_path / "extracted"
    with tarfile.open(cifar_tarball) as tar:
        tar.extractall(extracted, filter="data")

    from_parent = load_cifar10(extracted, "train")
    from_folder = load_cifar10(extracted / "cifar-10-batches-py", "train")

    assert from_tarball.x.shape == (5 * PER_BATCH, 32, 32, 3)
    assert from_tarball.x.dtype == np.uint8 and from_tarball.y.dtype == np.int32
    for other in (from_parent, from_folder):
        np.testing.assert_array_equal(other.x, from_tarball.x)
        np.testing.assert_array_equal(other.y, from_tarball.y)
        assert other.fingerprint == from_tarball.fingerprint


def test_cifar_rows_become_hwc_rgb_images(cifar_tarball):
    train = load_cifar10(cifar_tarball, "train")
    np.testing.assert_array_equal(train.x[0], known_image())
    assert list(train.y[:3]) == [0, 1, 2]


def test_test_split_reads_only_the_test_batch(cifar_tarball):
    test = load_cifar10(cifar_tarball, "test")
    assert len(test) == PER_BATCH
    assert list(test.y[:2]) == [5, 6]  # test_batch is the sixth batch built above


def test_a_file_that_is_not_a_tarball_is_a_dataset_error(tmp_path):
    junk = tmp_path / "cifar-10-python.tar.gz"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(DatasetError, match="not a readable CIFAR-10 tarball"):
        load_cifar10(junk)


def test_a_truncated_tarball_is_a_dataset_error(tmp_path, cifar_tarball_bytes):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(cifar_tarball_bytes[: len(cifar_tarball_bytes) // 2])
    with pytest.raises(DatasetError):
        load_cifar10(cut)


def test_a_tarball_without_cifar_batches_is_a_dataset_error(tmp_path):
    other = tmp_path / "other.tar.gz"
    other.write_bytes(make_tarball({"notes.txt": b"hello"}, prefix="stuff/"))
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_cifar10(other)


def test_a_tarball_with_an_escaping_member_is_refused(tmp_path):
    files = make_batches()
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(make_tarball({**files, "../../escape": b"x"}))
    with pytest.raises(DatasetError, match="unsafe path"):
        load_cifar10(evil)
    assert not (tmp_path / "escape").exists()


def test_a_batch_with_the_wrong_shape_is_a_dataset_error(tmp_path):
    files = make_batches()
    bad = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}
    files["data_batch_3"] = pickle.dumps(bad, protocol=2)
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(make_tarball(files))
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_cifar10(path)


def test_load_dataset_and_eval_dataset_on_cifar(cifar_tarball):
    train, val = load_dataset(cifar_tarball, None)
    assert val is None and train.x.shape == (5 * PER_BATCH, 32, 32, 3)

    resized, _ = load_dataset(cifar_tarball, (16, 16))
    assert resized.x.shape == (5 * PER_BATCH, 16, 16, 3) and resized.x.dtype == np.uint8
    np.testing.assert_array_equal(resized.y, train.y)
    assert resized.fingerprint != train.fingerprint

    test = load_eval_dataset(cifar_tarball, (32, 32))
    assert len(test) == PER_BATCH


def test_a_missing_cifar_path_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere.tar.gz")


# Image folders


def copy_classes(source: Path, dest: Path, classes: list[str]) -> Path:
    for name in classes:
        shutil.copytree(source / name, dest / name)
    return dest


def test_the_fixture_folder_loads_with_sorted_classes(cifar_small, tmp_path):
    dataset = load_image_folder(cifar_small, (32, 32), cache_dir=tmp_path)

    assert isinstance(dataset, ImageSet)
    assert dataset.class_names == CLASSES
    assert dataset.x.shape == (80, 32, 32, 3) and dataset.x.dtype == np.uint8
    assert dataset.y.dtype == np.int32
    assert np.bincount(dataset.y).tolist() == [8] * 10
    np.testing.assert_array_equal(dataset.x[0], load_image(cifar_small / "airplane" / "0000.jpg"))
    assert len(dataset.fingerprint) == 64


def test_a_folder_resizes_to_the_requested_size(cifar_small, tmp_path):
    dataset = load_image_folder(cifar_small, (20, 24), cache_dir=tmp_path)
    assert dataset.x.shape == (80, 20, 24, 3)


def test_unreadable_files_are_skipped_with_one_warning(cifar_small, tmp_path, caplog):
    root = copy_classes(cifar_small, tmp_path / "ds", ["cat", "dog"])
    good = (root / "cat" / "0000.jpg").read_bytes()
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(500) + b"\xff\xd9")
    (root / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "dog" / "notes.jpg").write_text("this is not an image")

    with caplog.at_level(logging.WARNING, logger="imagerec.data"):
        dataset = load_image_folder(root, (32, 32), cache_dir=tmp_path / "cache")

    assert len(dataset) == 16
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 3 of 19" in message
    for name in ("corrupt.jpg", "truncated.jpg", "notes.jpg"):
        assert name in message


def test_the_skipped_list_is_shortened_when_many_files_fail(cifar_small, tmp_path, caplog):
    root = copy_classes(cifar_small, tmp_path / "ds", ["cat", "dog"])
    for i in range(15):
        (root / "cat" / f"bad{i:02d}.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="imagerec.data"):
        load_image_folder(root, (32, 32), cache_dir=tmp_path / "cache")
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 15 of 31" in message and "and 5 more" in message


def test_a_missing_path_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", (32, 32))


def test_an_empty_folder_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="no class folders"):
        load_image_folder(tmp_path, (32, 32))


def test_a_folder_with_one_class_is_a_dataset_error(cifar_small, tmp_path):
    root = copy_classes(cifar_small, tmp_path / "ds", ["cat"])
    with pytest.raises(DatasetError, match="at least 2"):
        load_image_folder(root, (32, 32), cache_dir=tmp_path / "cache")


def test_a_folder_of_non_images_is_a_dataset_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "one.jpg").write_text("text, not a JPEG")
        (tmp_path / name / "two.PNG").write_bytes(b"")
    with pytest.raises(DatasetError, match="none of the 4 image files"):
        load_image_folder(tmp_path, (32, 32), cache_dir=tmp_path / "cache")


def test_class_folders_without_image_files_are_a_dataset_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "readme.txt").write_text("hello")
    with pytest.raises(DatasetError, match="no image files"):
        load_image_folder(tmp_path, (32, 32))


def test_gray_rgba_and_16_bit_pngs_come_out_rgb_uint8(tmp_path):
    (tmp_path / "gray").mkdir()
    (tmp_path / "color").mkdir()
    cv2.imwrite(str(tmp_path / "gray" / "g.png"), np.full((40, 40), 100, np.uint8))
    bgra = np.zeros((40, 40, 4), np.uint8)
    bgra[..., 2] = 255  # red
    bgra[..., 3] = 255  # opaque
    cv2.imwrite(str(tmp_path / "color" / "a.PNG"), bgra)
    blue16 = np.zeros((40, 40, 3), np.uint16)
    blue16[..., 0] = 65535
    cv2.imwrite(str(tmp_path / "color" / "b.png"), blue16)

    dataset = load_image_folder(tmp_path, (32, 32), cache_dir=tmp_path / "cache")

    assert dataset.x.shape == (3, 32, 32, 3) and dataset.x.dtype == np.uint8
    by_class = {(dataset.class_names[label], i) for i, label in enumerate(dataset.y)}
    assert by_class == {("color", 0), ("color", 1), ("gray", 2)}
    assert (dataset.x[0] == [255, 0, 0]).all()  # RGBA red
    assert (dataset.x[1] == [0, 0, 255]).all()  # 16-bit blue
    assert (dataset.x[2] == 100).all()  # gray on all three channels


def test_train_val_layout_gives_both_sets_with_the_same_class_indices(cifar_small, tmp_path):
    root = tmp_path / "ds"
    copy_classes(cifar_small, root / "train", ["bird", "cat", "dog"])
    copy_classes(cifar_small, root / "val", ["dog"])

    train, val = load_dataset(root, (32, 32), cache_dir=tmp_path / "cache")

    assert train.class_names == val.class_names == ["bird", "cat", "dog"]
    assert len(train) == 24 and len(val) == 8
    assert set(val.y.tolist()) == {2}  # "dog" keeps its training index

    evaluated = load_eval_dataset(root, (32, 32), cache_dir=tmp_path / "cache")
    assert evaluated.fingerprint == val.fingerprint


def test_a_plain_folder_loads_whole_for_training_and_evaluation(cifar_small, tmp_path):
    train, val = load_dataset(cifar_small, (32, 32), cache_dir=tmp_path)
    assert val is None and len(train) == 80
    assert len(load_eval_dataset(cifar_small, (32, 32), cache_dir=tmp_path)) == 80


def test_a_val_class_unknown_to_training_is_a_dataset_error(cifar_small, tmp_path):
    root = tmp_path / "ds"
    copy_classes(cifar_small, root / "train", ["bird", "cat"])
    copy_classes(cifar_small, root / "val", ["bird", "frog"])
    with pytest.raises(DatasetError, match="frog"):
        load_dataset(root, (32, 32), cache_dir=tmp_path / "cache")


def test_a_missing_dataset_spec_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="no dataset at"):
        load_dataset(tmp_path / "nowhere", (32, 32))


# The decoded-array cache


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []

    def counting_load_image(path, size=None, *args, **kwargs):
        calls.append(path)
        return load_image(path, size, *args, **kwargs)

    monkeypatch.setattr(data, "load_image", counting_load_image)
    return calls


def test_a_second_load_comes_from_the_cache_without_decoding(cifar_small, tmp_path, count_decodes):
    first = load_image_folder(cifar_small, (32, 32), cache_dir=tmp_path)
    assert len(count_decodes) == 80
    (cache_file,) = (tmp_path / "arrays").glob("*.npz")

    second = load_image_folder(cifar_small, (32, 32), cache_dir=tmp_path)

    assert len(count_decodes) == 80
    np.testing.assert_array_equal(second.x, first.x)
    np.testing.assert_array_equal(second.y, first.y)
    assert second.fingerprint == first.fingerprint
    assert list((tmp_path / "arrays").iterdir()) == [cache_file]  # no temporary files left


def test_the_cache_is_keyed_by_content_and_size(cifar_small, tmp_path, count_decodes):
    root = copy_classes(cifar_small, tmp_path / "ds", ["cat", "dog"])
    load_image_folder(root, (32, 32), cache_dir=tmp_path / "cache")
    load_image_folder(root, (16, 16), cache_dir=tmp_path / "cache")
    assert len(count_decodes) == 32

    shutil.copy(root / "dog" / "0000.jpg", root / "cat" / "0000.jpg")
    changed = load_image_folder(root, (32, 32), cache_dir=tmp_path / "cache")

    assert len(count_decodes) == 48
    np.testing.assert_array_equal(changed.x[0], changed.x[8])


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "garbage"])
def test_a_damaged_cache_file_is_detected_and_rebuilt(
    damage, cifar_small, tmp_path, count_decodes, caplog
):
    root = copy_classes(cifar_small, tmp_path / "ds", ["cat", "dog"])
    original = load_image_folder(root, (32, 32), cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache" / "arrays").glob("*.npz")
    content = cache_file.read_bytes()
    if damage == "truncate":
        cache_file.write_bytes(content[: len(content) // 2])
    elif damage == "flip_bytes":
        middle = len(content) // 2
        cache_file.write_bytes(
            content[:middle] + bytes(b ^ 0xFF for b in content[middle : middle + 64])
            + content[middle + 64 :]
        )  # fmt: skip
    else:
        cache_file.write_bytes(b"not an npz file")

    with caplog.at_level(logging.WARNING, logger="imagerec.data"):
        rebuilt = load_image_folder(root, (32, 32), cache_dir=tmp_path / "cache")

    assert len(count_decodes) == 32  # decoded again
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(rebuilt.x, original.x)
    assert rebuilt.fingerprint == original.fingerprint
    assert cache_file.read_bytes() != b"not an npz file" and len(cache_file.read_bytes()) > 1000


def test_an_unwritable_cache_only_warns(cifar_small, tmp_path, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    root = copy_classes(cifar_small, tmp_path / "ds", ["cat", "dog"])
    with caplog.at_level(logging.WARNING, logger="imagerec.data"):
        dataset = load_image_folder(root, (32, 32), cache_dir=blocker)
    assert len(dataset) == 16
    assert any("could not write the array cache" in r.getMessage() for r in caplog.records)


# Streaming


def test_a_folder_over_the_memory_limit_streams_through_tf_data(cifar_small, tmp_path):
    root = copy_classes(cifar_small, tmp_path / "ds", ["bird", "cat", "dog"])
    (root / "dog" / "zz-broken.jpg").write_text("not an image")
    (root / "bird" / "0000.jpg").rename(root / "bird" / "0000-oiseau-\u00e9t\u00e9.jpg")

    dataset = load_image_folder(root, (24, 24), cache_dir=tmp_path, memory_limit_bytes=1000)

    assert isinstance(dataset, StreamingImageSet)
    assert len(dataset) == 24 and dataset.image_size == (24, 24)
    assert not (tmp_path / "arrays").exists()  # nothing decoded up front

    batches = list(dataset.to_tf_dataset(batch_size=10, shuffle=False, seed=0))
    assert [tuple(images.shape) for images, _ in batches] == [(10, 24, 24, 3)] * 2 + [
        (4, 24, 24, 3)
    ]
    assert batches[0][0].dtype.name == "uint8" and batches[0][1].dtype.name == "int32"
    labels = np.concatenate([lab.numpy() for _, lab in batches])
    np.testing.assert_array_equal(labels, dataset.y)
    np.testing.assert_array_equal(batches[0][0][0].numpy(), load_image(dataset.paths[0], (24, 24)))

    shuffled = np.concatenate(
        [lab.numpy() for _, lab in dataset.to_tf_dataset(batch_size=10, shuffle=True, seed=1)]
    )
    assert sorted(shuffled.tolist()) == sorted(labels.tolist())
    assert shuffled.tolist() != labels.tolist()

    sample = dataset.sample_arrays(5, seed=0)
    assert sample.shape == (5, 24, 24, 3) and sample.dtype == np.uint8


def _with_bogus_sampling(jpeg: bytes) -> bytes:
    out, i = bytearray(jpeg), 2
    while out[i + 1] not in (0xC0, 0xC2):  # walk to the frame header
        i += 2 + int.from_bytes(out[i + 2 : i + 4], "big")
    out[i + 11] = 0  # first component's sampling factors: invalid, but only the decoder looks
    return bytes(out)


def test_a_streamed_file_that_fails_to_decode_is_dropped(cifar_small, tmp_path):
    root = copy_classes(cifar_small, tmp_path / "ds", ["cat", "dog"])
    good = (root / "dog" / "0000.jpg").read_bytes()
    # Complete, with a readable size, but impossible sampling factors: the cheap header check
    # passes and only the decoder finds out.
    (root / "dog" / "zz-scan.jpg").write_bytes(_with_bogus_sampling(good))
    dataset = load_image_folder(root, (32, 32), cache_dir=tmp_path, memory_limit_bytes=1000)

    assert len(dataset) == 17  # its header looks fine, so it is only found out when decoded

    labels = np.concatenate(
        [lab.numpy() for _, lab in dataset.to_tf_dataset(batch_size=64, shuffle=False, seed=0)]
    )
    assert len(labels) == 16


# Splitting and statistics


def numbered_set(counts: list[int]) -> ImageSet:
    """Items whose first pixel holds their index, in classes of the given sizes."""
    y = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    x = np.zeros((len(y), 4, 4, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(len(y)) % 256
    x[:, 0, 0, 1] = np.arange(len(y)) // 256
    names = [f"c{i}" for i in range(len(counts))]
    return ImageSet(x, y, names, data.fingerprint_arrays(x, y, names))


def ids(dataset: ImageSet) -> list[int]:
    pixels = dataset.x[:, 0, 0, :2].astype(int)
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def test_split_is_stratified_disjoint_and_complete():
    dataset = numbered_set([50, 30, 20])
    train, val = stratified_split(dataset, 0.2, seed=0)

    assert np.bincount(val.y).tolist() == [10, 6, 4]
    assert np.bincount(train.y).tolist() == [40, 24, 16]
    assert not set(ids(train)) & set(ids(val))
    assert sorted(ids(train) + ids(val)) == list(range(100))
    labels = dict(zip(ids(dataset), dataset.y.tolist(), strict=True))
    assert all(labels[i] == label for i, label in zip(ids(val), val.y.tolist(), strict=True))


def test_split_is_deterministic_for_a_seed_and_differs_for_another():
    dataset = numbered_set([50, 30, 20])
    _, val_a = stratified_split(dataset, 0.2, seed=7)
    _, val_b = stratified_split(dataset, 0.2, seed=7)
    _, val_c = stratified_split(dataset, 0.2, seed=8)
    assert ids(val_a) == ids(val_b) and val_a.fingerprint == val_b.fingerprint
    assert ids(val_a) != ids(val_c)


def test_split_gives_small_classes_one_validation_item():
    dataset = numbered_set([40, 2, 1])
    train, val = stratified_split(dataset, 0.1, seed=0)
    assert np.bincount(val.y, minlength=3).tolist() == [4, 1, 0]
    assert np.bincount(train.y, minlength=3).tolist() == [36, 1, 1]


def test_split_without_a_class_of_two_keeps_everything_for_training():
    dataset = numbered_set([1, 1, 1])
    train, val = stratified_split(dataset, 0.5, seed=0)
    assert train is dataset and val is None


def test_split_of_zero_returns_the_set_unchanged():
    dataset = numbered_set([5, 5])
    train, val = stratified_split(dataset, 0.0, seed=0)
    assert train is dataset and val is None


def test_split_of_a_streaming_set_splits_its_paths(cifar_small, tmp_path):
    dataset = load_image_folder(cifar_small, (32, 32), cache_dir=tmp_path, memory_limit_bytes=1)
    train, val = stratified_split(dataset, 0.25, seed=0)
    assert isinstance(train, StreamingImageSet) and isinstance(val, StreamingImageSet)
    assert np.bincount(val.y).tolist() == [2] * 10
    assert not set(train.paths) & set(val.paths)
    assert set(train.paths) | set(val.paths) == set(dataset.paths)
    assert train.fingerprint != val.fingerprint != dataset.fingerprint


def test_channel_stats_match_numpy_in_float64():
    x = np.random.default_rng(0).integers(0, 256, (300, 17, 13, 3), dtype=np.uint8)
    mean, std = channel_stats(x)
    flat = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(axis=0), rtol=1e-10)


def test_channel_stats_on_constant_and_strided_images():
    x = np.zeros((10, 8, 8, 3), np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = 10, 20, 255
    mean, std = channel_stats(x)
    assert mean == [10.0, 20.0, 255.0] and std == [0.0, 0.0, 0.0]

    big = np.random.default_rng(1).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    strided = big[::2, ::2, ::2]
    flat = strided.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(channel_stats(strided)[1], flat.std(axis=0), rtol=1e-10)


def test_importing_data_does_not_import_tensorflow():
    code = "import sys, imagerec.data; print('tensorflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
