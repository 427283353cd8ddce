"""The dtypes a q8 file can hold, by the names the file stores them under (docs/FORMAT.md)."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "DTYPE_NAMES", "PLANE_WIDTH", "dtype_from_name", "dtype_name"]

_NAMES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)

DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
"""File name -> torch dtype, for every dtype this torch build knows."""

DTYPE_NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}

PLANE_WIDTH: dict[torch.dtype, int] = {
    d: w
    for n, w in {
        "float16": 2,
        "bfloat16": 2,
        "float32": 4,
        "float64": 8,
        "complex32": 2,
        "complex64": 4,
        "complex128": 8,
    }.items()
    if (d := DTYPES.get(n)) is not None
}
"""Dtypes the byte-plane (lossless float) encoding applies to -> bytes per float component."""


def dtype_name(dtype: torch.dtype) -> str:
    """The file name of `dtype`; TypeError for a dtype the format cannot hold."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"the q8 format cannot hold dtype {dtype}; supported: {', '.join(DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype stored under `name`, or None if unknown."""
    return DTYPES.get(name)
