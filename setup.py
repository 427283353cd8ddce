"""Build hook for the compiled pieces of q8: the CPU codec (codec/_native.c), the byte
planes of the container format (formats/_planes.c) and the fused 8-bit optimizer update
(optim/_native.c, which shares the codec rule through codec/q8_codec.h).

Everything else is declared in pyproject.toml.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """The repository root is the package q8, so this script would ship as q8/setup.py."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("q8", "setup")]


# Exactness: no fused multiply-add contraction, no fast-math.
EXACT_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c11"]
# Linux: block ranges on OpenMP threads. The extensions then need libgomp.so.1, the library
# torch's CPU ops run on, and share its thread pool (codec/q8_codec.h). Elsewhere the
# ranges run on Python threads (codec/native.py).
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []

setup(
    cmdclass={"build_py": BuildPy},
    ext_modules=[
        Extension(
            "q8.codec._native",
            sources=["codec/_native.c"],
            depends=["codec/q8_codec.h"],
            extra_compile_args=[*EXACT_FLAGS, *OPENMP],
            extra_link_args=OPENMP,
        ),
        Extension("q8.formats._planes", sources=["formats/_planes.c"], extra_compile_args=["-O3", "-std=c11"]),
        Extension(
            "q8.optim._native",
            sources=["optim/_native.c"],
            include_dirs=["codec"],
            depends=["codec/q8_codec.h"],
            # sqrt never sets errno here (its argument is >= 0): lets sqrtf vectorise, same results
            extra_compile_args=[*EXACT_FLAGS, "-fno-math-errno", *OPENMP],
            extra_link_args=OPENMP,
        ),
    ],
)
