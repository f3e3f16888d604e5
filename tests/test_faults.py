"""Crash and disk faults: a server killed with SIGKILL under load starts again with nothing to
repair; a bundle or a training checkpoint that cannot be written for want of space says so,
and leaves what was there whole. The full disks are real: small tmpfs filesystems mounted for
the test (it needs root, as CI has; elsewhere it is skipped with the reason)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from imagerec.bundle import Preprocess, verify_bundle, write_bundle
from imagerec.errors import BundleError
from live_server import free_port, wait_for
from tiny_bundle import SAMPLES

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = Path(__file__).resolve().parents[1] / "models" / "cifar10"


class SmallDisk:
    """A tmpfs of a given size at `path`, resizable, unmounted at the end."""

    def __init__(self, path: Path):
        self.path = path

    def resize(self, size_bytes: int) -> None:
        kilobytes = max(4, size_bytes // 1024)
        done = subprocess.run(
            ["mount", "-o", f"remount,size={kilobytes}k", str(self.path)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(done.stderr)

    def used(self) -> int:
        stats = os.statvfs(self.path)
        return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")
    try:
        yield SmallDisk(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def small_model(units: int):
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(units, activation="softmax"),
        ]
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_bundle_save_that_runs_out_of_space_leaves_the_previous_bundle(small_disk):
    """The new bundle's save fails at every stage in turn (the disk a few KB larger each
    time); each time the previous bundle still verifies, nothing half-written is left, and the
    error says why."""
    out = small_disk.path / "model"
    labels = [f"class{i}" for i in range(10)]
    preprocess = Preprocess(input_size=(32, 32))
    before = verify_bundle(write_bundle(out, small_model(10), labels, preprocess, {"v": 1}))
    newer = small_model(10)
    newer.layers[-1].set_weights([w + 1 for w in newer.layers[-1].get_weights()])
    used = small_disk.used()
    failures, room = [], 0
    while True:
        small_disk.resize(used + room)
        try:
            write_bundle(out, newer, labels, preprocess, {"v": 2})
        except BundleError as exc:
            failures.append(room)
            assert "No space left on device" in exc.message
            assert "the bundle already there is unchanged" in exc.message
            assert verify_bundle(out) == before
            assert leftovers(small_disk.path) == []
            room += 16 * 1024
            continue
        break
    assert len(failures) >= 5  # it failed at many points before there was room enough
    assert verify_bundle(out) != before


def test_a_checkpoint_that_cannot_be_written_stops_training_with_a_message(small_disk, tmp_path):
    out = small_disk.path / "model"
    shutil.copytree(MODEL, out)  # a bundle already there, which must survive
    before = verify_bundle(out)
    small_disk.resize(small_disk.used() + 64 * 1024)  # the run's marker fits; a checkpoint not
    data = FIXTURES / "cifar_small"
    command = [sys.executable, "-m", "imagerec.cli", "train", "--data", str(data)]
    command += ["--out", str(out), "--epochs", "2", "--batch-size", "16", "--widths", "8,16"]
    command += ["--cache-dir", str(tmp_path)]
    # Each run in its own process, as from the command line: HDF5 is left in no state to write
    # again in a process where one of its writes failed.
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "checkpoint" in done.stderr and "No space left on device" in done.stderr
    assert "run the same command again" in done.stderr
    assert "Traceback" not in done.stderr
    assert verify_bundle(out) == before
    # No torn checkpoint is left to trip the next run: with room, the same command completes.
    small_disk.resize(64 * 1024 * 1024)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert verify_bundle(out) != before


def test_a_server_killed_under_load_starts_again_and_serves(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "imagerec.cli", "serve", "--model", str(MODEL)]
    command += ["--port", str(port)]
    image = SAMPLES[0].read_bytes()
    answers: list[int] = []
    stop = threading.Event()

    def client():
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    answer = session.post(
                        url + "/v1/predict",
                        data=image,
                        headers={"Content-Type": "image/jpeg"},
                        timeout=10,
                    )
                    answers.append(answer.status_code)
                except requests.RequestException:
                    answers.append(0)

    def start(log: Path) -> subprocess.Popen:
        with open(log, "w") as handle:
            # Its own session: SIGKILL then reaches Granian's worker too, as a supervisor's
            # kill of the whole service would.
            process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(url + "/readyz", 200, process)
        return process

    first = start(tmp_path / "first.log")
    clients = [threading.Thread(target=client) for _ in range(8)]
    try:
        for thread in clients:
            thread.start()
        while answers.count(200) < 50:
            assert first.poll() is None
            threading.Event().wait(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    second = start(tmp_path / "second.log")
    try:
        answer = requests.post(
            url + "/v1/predict", data=image, headers={"Content-Type": "image/jpeg"}, timeout=30
        )
        assert answer.status_code == 200
        assert answer.json()["results"][0]["label"]
        assert verify_bundle(MODEL)  # the model it served is untouched
        log = (tmp_path / "second.log").read_text()
        assert "Traceback" not in log and "ERROR" not in log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(second.pid, signal.SIGTERM)
        second.wait(30)
