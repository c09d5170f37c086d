"""Builds csrc/ through CMake into the extension module fastllava._packing.

Metadata lives in pyproject.toml; this file only adds the CMake-driven extension. cmake comes from
the `cmake` PyPI package (a build requirement) or, failing that, from PATH.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])  # CMake compiles; setuptools only places the result
        self.source_dir = source_dir


def _cmake_executable() -> str:
    try:
        import cmake  # the PyPI package ships its own binary

        candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("cmake")
    if found is None:
        raise RuntimeError("building fastllava._packing needs cmake >= 3.18: pip install cmake")
    return found


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake_executable()
        configure = [
            cmake,
            str(ext.source_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTLLAVA_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", ".", "--config", "Release", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("fastllava._packing", ROOT / "csrc")],
    cmdclass={"build_ext": CMakeBuild},
)
