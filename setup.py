"""Builds csrc/ through the top-level CMakeLists.txt into the extension module fastllava._packing.

Metadata lives in pyproject.toml; this file only adds the CMake-driven extension. cmake and ninja come
from their PyPI packages (build requirements) or, failing that, from PATH; without ninja CMake's default
generator builds it.
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


def _tool(name: str) -> str | None:
    """The binary of the PyPI package `name` (cmake and ninja ship their own), else one on PATH."""
    try:
        module = __import__(name)
        candidate = Path(getattr(module, f"{name.upper()}_BIN_DIR", getattr(module, "BIN_DIR", ""))) / name
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which(name)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake")
        if cmake is None:
            raise RuntimeError("building fastllava._packing needs cmake >= 3.18: pip install cmake")
        ninja = _tool("ninja")
        generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
        configure = [
            cmake,
            str(ext.source_dir),
            *generator,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTLLAVA_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", ".", "--config", "Release", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("fastllava._packing", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
