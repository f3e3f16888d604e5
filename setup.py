"""Only what pyproject.toml cannot say: the wheel carries the bundled model as package data.

The model lives once, in models/cifar10/ (where training writes it and the README points); the
build copies it to imagerec/bundled/cifar10/ inside the wheel, byte for byte, so the manifest
still verifies it when an installed `imagerec` loads it.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED_MODEL = Path(__file__).parent / "models" / "cifar10"


class BuildWithBundledModel(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads models/cifar10 where it lies
            return
        target = Path(self.build_lib) / "imagerec" / "bundled" / "cifar10"
        shutil.rmtree(target, ignore_errors=True)  # no file left from an earlier build
        shutil.copytree(BUNDLED_MODEL, target)


setup(cmdclass={"build_py": BuildWithBundledModel})
