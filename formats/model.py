"""`save_model` / `load_model`: a module's weights in one q8 file, tied weights stored once.

A state dict lists a tied weight (GPT-2's `lm_head.weight` is `transformer.wte.weight`)
under every name it has. `save_file` refuses tensors that share memory, as safetensors
does: stored twice they would load untied. `save_model` stores each storage once, under
its first name; `load_model` fills the other names from it, so the model's own tie is kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from ..codec import AUTO_CODES, QTensor, quantize_best
from .api import load_file, save_file, shared_groups, worth_quantizing

__all__ = ["load_model", "save_model"]

logger = logging.getLogger(__name__)

QUANTIZED_ERROR_KEY = "quantized_rel_l2_max"
"""Metadata of a file with 8-bit weights: the largest relative L2 error they were stored with."""


def save_model(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    quantize: bool = False,
    blocksize: int = 256,
) -> None:
    """Save a module's weights (or a state dict) to a q8 file, tied weights once, atomically.

    Args:
        model: an `nn.Module` (its `state_dict()`) or a state dict.
        path: destination file.
        metadata: user str -> str metadata.
        quantize: store float tensors of at least 4096 finite elements as 8-bit codes, per
            tensor the table (linear or dynamic) with the lowest error: about 4x smaller, a
            loss whose largest relative L2 error is logged and recorded in the metadata
            (`quantized_rel_l2_max`). Small, integer and non-finite tensors stay exact.
        blocksize: elements per block of the quantized tensors.

    Example:
        >>> q8.save_model(model, "model.q8")  # GPT-2's lm_head and wte: stored once
        >>> q8.load_model(model, "model.q8")
    """
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    aliases = {name for group in shared_groups(weights) for name in group[1:]}
    unique: dict[str, torch.Tensor | QTensor] = {}
    worst = 0.0
    for name, t in weights.items():
        if name in aliases:
            continue
        if quantize and isinstance(t, torch.Tensor) and worth_quantizing(t):
            t, error = quantize_best(t, AUTO_CODES[bool((t < 0).any())], blocksize)
            worst = max(worst, error.rel_l2)
        unique[name] = t
    metadata = dict(metadata or {})
    if quantize:
        metadata[QUANTIZED_ERROR_KEY] = f"{worst:.3e}"
        logger.warning(f"{path}: model weights stored as 8-bit codes, max relative L2 error {worst:.3e}")
    save_file(unique, path, metadata=metadata)


def load_model(
    model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True, device: str | torch.device = "cpu"
) -> tuple[list[str], list[str]]:
    """Load a q8 weights file (`save_model`, `save_file`, q8convert's `model.q8`) into
    `model`; a tied weight may be stored under any one of its names.

    Returns:
        (missing, unexpected): the model's names the file lacks, the file's names the model
        lacks (both empty with `strict=True`, which raises ValueError naming the file instead).
        Raises `q8.FormatError` for a corrupt file.

    Example:
        >>> missing, unexpected = q8.load_model(model, "model.q8", strict=False)
    """
    weights = load_file(path, device)
    expected = model.state_dict()
    for group in shared_groups(expected):  # fill the other names of tied weights
        present = next((name for name in group if name in weights), None)
        for name in group:
            if present is not None and name not in weights:
                weights[name] = weights[present]
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path}: model weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: model weights do not match the model: {e}") from e
    return missing, unexpected
