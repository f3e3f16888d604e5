"""The wheel: what `python -m build --wheel` makes carries the bundled model and the page.

That the installed wheel serves from outside the checkout is checked by .ci/check-wheel, which
installs it, with TensorFlow, into a new virtual environment.
"""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "cifar10"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("imagerec-*-py3-none-any.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_the_wheel_carries_the_bundled_model_byte_for_byte(wheel):
    inside = {
        name.removeprefix("imagerec/bundled/cifar10/"): wheel.read(name)
        for name in wheel.namelist()
        if name.startswith("imagerec/bundled/cifar10/")
    }
    on_disk = {p.name: p.read_bytes() for p in BUNDLED.iterdir()}
    assert inside.keys() == on_disk.keys()
    for name, data in on_disk.items():
        assert inside[name] == data, name


def test_the_wheel_carries_the_page_and_the_command(wheel):
    names = set(wheel.namelist())
    for name in ("index.html", "app.js", "style.css"):
        assert f"imagerec/web/{name}" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "imagerec = imagerec.cli:main" in wheel.read(entry_points).decode()


def test_the_wheel_declares_the_supported_pythons(wheel):
    (metadata_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.message_from_bytes(wheel.read(metadata_name))
    assert SpecifierSet(metadata["Requires-Python"]) == SpecifierSet(">=3.11,<3.14")
    classifiers = metadata.get_all("Classifier")
    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert any(r.startswith("hug-upgraded") for r in metadata.get_all("Requires-Dist"))
