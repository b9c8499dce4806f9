"""Builds ferret's wheel: CMake compiles ferret_core/ and bindings/ into ferret._core.

Metadata lives in pyproject.toml; this file only drives CMake and maps the source folders
(python/ferret -> ferret, kernels -> ferret.kernels) into the package.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *config], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_core", "-j", jobs], check=True)


setup(
    package_dir={"ferret": "python/ferret", "ferret.kernels": "kernels"},
    packages=["ferret", "ferret.lora", "ferret.fl", "ferret.fl.algorithms", "ferret.flower", "ferret.kernels"],
    package_data={"ferret": ["py.typed", "assets/stories260K/*"]},
    ext_modules=[CMakeExtension("ferret._core")],
    cmdclass={"build_ext": CMakeBuild},
)
