"""The logic of the benchmark scripts that is not a measurement: what they write and compute."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import jpeg_quality  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "cifar_small"


def test_recompress_writes_every_image_again_at_the_lower_quality(tmp_path):
    out = tmp_path / "q30"
    stats = jpeg_quality.recompress(DATA, out, 30)
    names = sorted(p.relative_to(DATA) for p in DATA.glob("*/*.jpg"))
    assert sorted(p.relative_to(out) for p in out.glob("*/*.jpg")) == names
    psnr = []
    for name in names:
        before = cv2.imread(str(DATA / name)).astype(np.float64)
        after = cv2.imread(str(out / name)).astype(np.float64)
        assert after.shape == before.shape and not np.array_equal(after, before)
        psnr.append(10 * np.log10(255**2 / np.mean((after - before) ** 2)))
    assert stats["psnr_db"] == pytest.approx(np.mean(psnr), rel=1e-12)
    sizes = [(out / name).stat().st_size for name in names]
    assert stats["bytes"] == np.mean(sizes) < np.mean([(DATA / n).stat().st_size for n in names])
