"""Build hook for the compiled pieces of q8: the CPU codec (codec/_native.c) and the byte
planes of the container format (formats/_planes.c).

Everything else is declared in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "q8.codec._native",
            sources=["codec/_native.c"],
            # Exactness: no fused multiply-add contraction, no fast-math.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c11"],
        ),
        Extension("q8.formats._planes", sources=["formats/_planes.c"], extra_compile_args=["-O3", "-std=c11"]),
    ]
)
