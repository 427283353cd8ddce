"""`q8convert info --plot`: the size/error trade-off of a q8 file as a picture.

One point per quantized tensor: stored bits per element against its relative L2 error,
coloured by layer (the first number in the tensor's name) and labelled with the name;
the target error the file was converted with (or its model error), if any, as a dashed
line. Needs matplotlib (`pip install 'q8[plot]'`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

__all__ = ["PlotUnavailable", "plot_tradeoff"]

_MAX_LABELS = 80  # more points than this: colours only, names would overlap into a blur


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def _layer(name: str) -> str:
    m = re.search(r"(?:^|\.)(\d+)\.", name)
    return f"layer {m[1]}" if m else "other"


def _short(name: str) -> str:
    """The name without the usual wrappers ("model.", "transformer.", ".weight")."""
    for prefix in ("model.", "transformer.", "bert.", "encoder.", "layers.", "layer."):
        name = name.removeprefix(prefix)
    return name.removesuffix(".weight")


def plot_tradeoff(rows: list[dict], path: Path, title: str) -> int:
    """Draw `rows` (from `q8convert info --json`: name, shape, stored_bytes, rel_l2, extra)
    into `path` (any format matplotlib writes: .png, .svg, .pdf). Returns the number of
    points drawn; raises PlotUnavailable without matplotlib."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'q8[plot]' (or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["rel_l2"]]
    exact = len(rows) - len(points)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    layers = sorted({_layer(r["name"]) for r in points}, key=lambda s: (s == "other", len(s), s))
    colours = plt.get_cmap("viridis" if len(layers) > 10 else "tab10")
    for i, layer in enumerate(layers):
        mine = [r for r in points if _layer(r["name"]) == layer]
        xs = [r["rel_l2"] for r in mine]
        ys = [8 * r["stored_bytes"] / max(1, math.prod(r["shape"])) for r in mine]
        colour = colours(i / max(1, len(layers) - 1)) if len(layers) > 10 else colours(i % 10)
        ax.scatter(xs, ys, s=28, color=colour, label=layer, zorder=3)
        if len(points) <= _MAX_LABELS:
            for r, x, y in zip(mine, xs, ys, strict=True):
                ax.annotate(_short(r["name"]), (x, y), fontsize=6.5, xytext=(3, 2), textcoords="offset points")
    lines = {float(r["extra"]["model_error"]): "model error" for r in points if "model_error" in r["extra"]}
    lines = lines or {float(r["extra"]["target_error"]): "target" for r in points if "target_error" in r["extra"]}
    for value, what in sorted(lines.items()):  # a model error's shares differ per tensor: its own line only
        ax.axvline(value, linestyle="--", color="grey", zorder=1)
        ax.annotate(f"{what} {value:.3g}", (value, 1), xycoords=("data", "axes fraction"), fontsize=8,
                    xytext=(3, -12), textcoords="offset points", color="grey")  # fmt: skip
    ax.set_xlabel("relative L2 error of the tensor")
    ax.set_ylabel("stored bits per element (fp32: 32)")
    ax.set_title(f"{title}: {len(points)} quantized tensors" + (f" ({exact} exact, not shown)" if exact else ""))
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(fontsize=8, ncol=2 if len(layers) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(points)
