"""q8convert: existing fp32 checkpoints into the q8 container and back; inspect and verify.

    q8convert SRC -o DST          convert (file or folder); see `q8convert --help`
    q8convert decode SRC -o DST   back to safetensors / a Hugging Face folder / optimizer.pt
    q8convert info FILE [--json] [--plot PNG]  per tensor: encoding, bytes, error, why; the trade-off drawn
    q8convert verify FILE         every checksum; exit code 1 if one fails

Everything is written into a temporary folder next to DST and renamed into place at the
end: a conversion that fails leaves no partial output (and any previous DST untouched).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import q8
import torch
from q8.formats.atomic import make_temp_dir, temp_name
from q8.formats.checkpoints import (
    TORCH_OPTIMIZER_FILE,
    TORCH_SUFFIXES,
    InputError,
    SafetensorsFile,
    TensorRef,
    file_refs,
    find_checkpoint,
    is_flat_state_dict,
    load_torch_file,
    safetensors_name,
    shard_refs,
    write_safetensors,
)

from . import search
from .plot import PlotUnavailable, plot_tradeoff
from .policy import MAX_SHARE, Decision, Policy
from .progress import LineProgress, fmt_bytes, progress
from .state import from_container, to_container

__all__ = [
    "EXIT_CORRUPT",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_OUTPUT",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "main",
]

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE, EXIT_INPUT, EXIT_OUTPUT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143: the shell's convention
KIND, SOURCE = "q8convert.kind", "q8convert.source"  # metadata: "weights" or "object"; the original file name
OPTIMIZER_KEYS = {q8.optim.persist.METADATA_KEY, q8.optim.persist.CLASS_KEY}  # metadata of q8.save_optimizer files
INDEX_SUFFIX = ".index.json"
TRAINING_WEIGHTS = "training checkpoint, for an exact resume (--quantize-weights)"

EXAMPLES = """\
examples:
  q8convert ./checkpoint-500 -o ./checkpoint-500.q8       # a Trainer checkpoint folder
  q8convert model.safetensors -o model.q8 --target-error 0.005   # per tensor: smallest within 0.5%
  q8convert model.safetensors -o model.q8 --blocksize 256   # no target: every tensor at 256
  q8convert model.safetensors.index.json -o model.q8 --max-shard-size 2GB
  q8convert pytorch_model.bin -o model.q8 --keep 'lm_head.*' --max-error 0.01
  q8convert model.safetensors -o model.q8 --lossless      # exact, compressed only
  q8convert decode ./checkpoint-500.q8 -o ./checkpoint-500-restored
  q8convert info model.q8 [--json] [--plot tradeoff.png]
  q8convert verify model.q8

exit codes: 0 ok; 1 a q8 file is corrupt (verify, decode, info); 2 bad arguments;
3 an input cannot be read or converted; 4 the output cannot be written (or exists);
130 interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM). Nothing partial is left behind."""


class OutputError(Exception):
    """The output cannot be written (it exists, or the disk refused)."""


class UsageError(Exception):
    """The arguments do not fit the input (e.g. an output suffix for another kind of file)."""


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler, `timeout`, `kill`): unwinds like Ctrl-C, cleaning up."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


# -- staging: all or nothing -------------------------------------------------------------


@contextmanager
def staged(dst: Path, folder: bool, overwrite: bool) -> Iterator[Path]:
    """A temporary folder next to `dst` to build the output in, removed whatever happens.

    On success a `folder` output replaces `dst` as a whole; otherwise the files built
    (`dst`, or its shards and index) are moved next to `dst`, each atomically.
    """
    index = Path(f"{dst}{INDEX_SUFFIX}")
    if (dst.exists() or index.exists()) and not overwrite:
        raise OutputError(f"{dst if dst.exists() else index}: already exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)  # as `mkdir -p`: a missing parent folder is made
    token = secrets.token_hex(4)
    tmp, lock = make_temp_dir(dst, token)  # also removes what killed runs left for dst
    old = temp_name(dst, "old", token)
    try:
        yield tmp
        if folder:
            if dst.exists():
                dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            built = {p.name for p in tmp.iterdir()}
            for stale in (dst, index):  # a single file and an index would shadow each other
                if stale.is_file() and stale.name not in built:
                    stale.unlink()
            for name in sorted(built, key=lambda n: n.endswith(INDEX_SUFFIX)):  # the index last
                os.replace(tmp / name, dst.parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


class ShardedWriter:
    """`q8.Writer` over consecutive shards of at most `max_shard_size` stored bytes, named
    and indexed like `q8.save_file(max_shard_size=...)` once their number is known."""

    def __init__(self, path: Path, metadata: dict[str, str], max_shard_size: int | None) -> None:
        self.path, self.metadata, self.limit = path, metadata, max_shard_size
        self.parts: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.size = 0
        self.total = 0
        self.writer: q8.Writer | None = None

    def add(self, name: str, x: torch.Tensor | q8.QTensor, extra: dict[str, str]) -> None:
        n = x.nbytes
        if self.writer is None or (self.limit and self.size and self.size + n > self.limit):
            self._next()
        self.writer.add(name, x, extra=extra)
        self.weight_map[name] = len(self.parts) - 1
        self.size += n
        self.total += n

    def _next(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.parts.append(self.path.with_name(f".part{len(self.parts)}{self.path.suffix}"))
        self.writer = q8.Writer(self.parts[-1], self.metadata)
        self.size = 0

    def close(self) -> list[Path]:
        """Finish the last shard; rename the shards and write the index. The files written."""
        if self.writer is None:
            self._next()
        self.writer.close()
        if len(self.parts) == 1:
            self.parts[0].rename(self.path)
            return [self.path]
        n = len(self.parts)
        names = [self.path.with_name(f"{self.path.stem}-{i:05d}-of-{n:05d}{self.path.suffix}") for i in range(1, n + 1)]
        for part, name in zip(self.parts, names, strict=True):
            part.rename(name)
        index = Path(f"{self.path}{INDEX_SUFFIX}")
        weight_map = {k: names[i].name for k, i in self.weight_map.items()}
        meta = {**self.metadata, "format": "q8", "total_size": self.total}
        index.write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2))
        return [*names, index]


# -- convert -----------------------------------------------------------------------------


def _convert_weights(
    refs: list[TensorRef], out: Path | None, metadata: dict, policy: Policy, args, bar: LineProgress
) -> list[Decision]:
    """Stream tensors through the policy into `out` (None: dry run); first, with a model
    error, the model's scale from a sample of each tensor it covers."""
    policy = policy.for_model((math.prod(r.shape), _sample(r)) for r in refs if policy.covers(r.name, r.dtype, r.shape))
    writer = ShardedWriter(out, metadata, args.max_shard_size) if out else None
    decisions, held = [], set()
    try:
        for ref in refs:
            bar.set_postfix_str(ref.name[-40:], refresh=False)
            stored, d = policy.apply(ref.name, ref.load(), "", held)  # the fp32 original is freed once quantized
            if d.stored_bytes is None:  # the target search measured it compressed already
                d.stored_bytes = stored.nbytes
            if writer:
                writer.add(ref.name, stored, d.extra())
            decisions.append(d)
            del stored
            bar.update(ref.nbytes)
        if writer:
            _record_stored_bytes(writer.close()[-1], decisions)
    except BaseException:
        if writer and writer.writer:
            writer.writer.abort()
        raise
    return decisions


def _sample(ref: TensorRef) -> torch.Tensor:
    """The search's sample of a tensor (`search.sample`), reading only its slices where the
    file allows it."""
    starts = search.sample_starts(math.prod(ref.shape))
    if starts is None or ref.read is None:
        return search.sample(ref.load())
    return torch.cat([ref.read(start, search.SLICE) for start in starts])


def _record_stored_bytes(path: Path, decisions: list[Decision]) -> None:
    """The bytes each tensor really takes in the file (after compression), from its index.
    (`q8.save` stores a tensor that appears twice once, under its first name.)"""
    with q8.safe_open(path) as f:
        names = set(f.keys())
        for d in decisions:
            d.stored_bytes = f.info(d.name)["stored_bytes"] if d.name in names else 0


def _convert_object(src: Path, obj: Any, out: Path | None, policy: Policy, bar: LineProgress) -> list[Decision]:
    """A nested checkpoint (optimizer state ...) through the policy into `out` via `q8.save`."""
    converted, decisions = to_container(obj, policy, str(src))
    if out:
        choices = {d.name: d.extra() for d in decisions}
        metadata = {KIND: "object", SOURCE: src.name, "q8convert.choices": json.dumps(choices)}
        try:
            q8.save(converted, out, metadata)
        except (TypeError, ValueError) as e:
            raise InputError(f"{src}: cannot be stored: {e}") from e
        _record_stored_bytes(out, decisions)
    bar.update(src.stat().st_size)
    return decisions


def _weights_metadata(refs_source: Path, source_name: str) -> dict[str, str]:
    meta = {}
    if refs_source.suffix == ".safetensors":
        meta = dict(SafetensorsFile(refs_source).metadata)
    return {**meta, KIND: "weights", SOURCE: source_name}


def _convert_file(src: Path, out: Path | None, policy: Policy, args, bar_args: dict) -> list[tuple[str, list]]:
    """One checkpoint file: weights (safetensors, index, flat .pt) or a nested .pt object."""
    if src.suffix in TORCH_SUFFIXES:
        obj = load_torch_file(src)
        if not is_flat_state_dict(obj):
            with progress(src.stat().st_size, src.name, **bar_args) as bar:
                return [(src.name, _convert_object(src, obj, out, policy, bar))]
        del obj
    refs = file_refs(src)
    with progress(sum(r.nbytes for r in refs), src.name, **bar_args) as bar:
        meta = _weights_metadata(src, src.name)
        return [(src.name, _convert_weights(refs, out, meta, policy, args, bar))]


def _convert_folder(src: Path, out: Path | None, policy: Policy, args, bar_args: dict) -> tuple[list, list[str]]:
    """A Hugging Face model or Trainer folder: weights to model.q8, optimizer.pt to
    optimizer.q8, every other file carried over unchanged."""
    ckpt = find_checkpoint(src)
    results = []
    if ckpt.weights:
        first = ckpt.weights[0]
        refs = file_refs(src / first) if len(ckpt.weights) == 1 or first.endswith(INDEX_SUFFIX) else None
        refs = refs if refs is not None else shard_refs(src, ckpt.weights)
        meta = _weights_metadata(src / first, first)
        out_weights = out and out / ckpt.weights_name
        weights_policy = policy
        if ckpt.is_training and not args.quantize_weights and not policy.lossless:
            weights_policy = dataclasses.replace(policy, lossless=True, lossless_reason=TRAINING_WEIGHTS)
        with progress(sum(r.nbytes for r in refs), "weights", **bar_args) as bar:
            results.append((first, _convert_weights(refs, out_weights, meta, weights_policy, args, bar)))
    if ckpt.optimizer:
        path = src / ckpt.optimizer
        with progress(path.stat().st_size, "optimizer", **bar_args) as bar:
            obj = load_torch_file(path)
            results.append((ckpt.optimizer, _convert_object(path, obj, out and out / "optimizer.q8", policy, bar)))
    if out:
        for name in ckpt.q8_files + ckpt.copies:
            (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, out / name)
    return results, ckpt.q8_files + ckpt.copies


def cmd_convert(args) -> int:
    src = Path(args.src)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    dst = Path(args.output) if args.output else _default_output(src)
    model_error = args.model_error
    if model_error is None and args.target_error is None and args.code is None and args.blocksize is None:
        model_error = "auto"  # the default: Adam moments keep their tables at blocksize 2048
    policy = Policy(
        lossless=args.lossless,
        blocksize=args.blocksize,
        code=args.code,
        keep=tuple(args.keep),
        max_error=args.max_error,
        target_error=args.target_error,
        model_error=model_error,
    )
    bar_args = {"quiet": args.quiet or args.json}
    if args.dry_run:
        results, copies = _run_convert(src, None, policy, args, bar_args)
    else:
        with staged(dst, src.is_dir(), args.overwrite) as tmp:
            out = tmp if src.is_dir() else tmp / dst.name
            results, copies = _run_convert(src, out, policy, args, bar_args)
    _report(results, copies, src, dst, args)
    return EXIT_OK


def _run_convert(src: Path, out: Path | None, policy: Policy, args, bar_args: dict) -> tuple[list, list[str]]:
    if src.is_dir():
        return _convert_folder(src, out, policy, args, bar_args)
    return _convert_file(src, out, policy, args, bar_args), []


def _default_output(src: Path) -> Path:
    """checkpoint-500 -> checkpoint-500.q8; model.safetensors(.index.json) -> model.q8."""
    if src.is_dir():
        return src.with_name(src.name + ".q8")
    return src.with_name(Path(src.name.removesuffix(INDEX_SUFFIX)).stem + ".q8")


# -- report ------------------------------------------------------------------------------


def _model_rel_l2(decisions: list[Decision]) -> float | None:
    """The relative L2 error of the tensors a model error covers, all together (None: no
    model error): sqrt(sum ||w - w'||^2 / sum ||w||^2), 0 for those stored exact."""
    covered = [d for d in decisions if d.model_error is not None]
    reference = sum(d.norm**2 for d in covered)
    if not covered:
        return None
    return math.sqrt(sum((d.rel_l2 * d.norm) ** 2 for d in covered) / reference) if reference else 0.0


def _table(rows: list[tuple], header: tuple) -> str:
    cells = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _report(results: list, copies: list[str], src: Path, dst: Path, args) -> None:
    """The summary table (one row per source file, encoding and reason), or JSON with every tensor."""
    every = [d for _, ds in results for d in ds]
    raw, stored = sum(d.raw_bytes for d in every), sum(d.stored_bytes for d in every)
    if args.json:
        doc = {
            "input": str(src),
            "output": None if args.dry_run else str(dst),
            "files": [
                {"source": name, "tensors": [vars(d) for d in ds], "model_rel_l2": _model_rel_l2(ds)}
                for name, ds in results
            ],
            "copied": copies,
            "totals": {"raw_bytes": raw, "stored_bytes": stored, "ratio": raw / stored if stored else None},
        }
        print(json.dumps(doc, indent=2))
        return
    if args.quiet:
        return
    groups: dict[tuple, list[Decision]] = {}
    for name, ds in results:
        for d in ds:
            what = f"{d.encoding} {d.code} (bs {d.blocksize})" if d.code else d.encoding
            groups.setdefault((name, what, d.reason), []).append(d)
    rows = []
    for (name, what, reason), ds in [*groups.items(), (("total", "", ""), every)]:
        n_raw, n_stored = sum(d.raw_bytes for d in ds), sum(d.stored_bytes for d in ds)
        err = f"{max(d.rel_l2 for d in ds):.2e}" if any(d.rel_l2 for d in ds) else "0"
        ratio = f"{n_raw / n_stored:.2f}x" if n_stored else "-"
        why = f"{what}: {reason}" if what else ""
        rows.append((name, why, len(ds), fmt_bytes(n_raw), fmt_bytes(n_stored), ratio, err))
    print(_table(rows, ("source", "what: why", "tensors", "input", "stored", "ratio", "max rel L2")))
    for name, ds in results:
        if (model := _model_rel_l2(ds)) is not None:
            covered = [d for d in ds if d.model_error is not None]
            given = "auto: " if args.model_error in (None, "auto") else ""
            print(f"{name}: relative L2 of its {len(covered)} weights together {model:.2e} "
                  f"(--model-error {given}{covered[0].model_error:.2e})")  # fmt: skip
    if copies:
        print(f"carried over unchanged: {', '.join(copies)}")
    if args.dry_run:
        print(f"dry run: nothing written (would write {dst}; sizes above: exact tensors before compression)")
    else:
        print(f"wrote {dst}")


# -- decode ------------------------------------------------------------------------------


def _q8_files(folder: Path) -> tuple[list[Path], set[str]]:
    """The q8 checkpoints in a folder (index files, and .q8 files that no index lists), and
    the names of the shards the indexes list."""
    indexes = sorted(folder.glob(f"*.q8{INDEX_SUFFIX}"))
    shards: set[str] = set()
    for index in indexes:
        try:
            shards |= set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise q8.FormatError(f"{index}: not a valid index json: {e}") from e
    return indexes + [p for p in sorted(folder.glob("*.q8")) if p.name not in shards], shards


def _check_q8(path: Path) -> None:
    """InputError unless `path` starts like a q8 file (or is an index json): a file of
    another kind is a bad input, not a corrupt q8 file."""
    if path.name.endswith(INDEX_SUFFIX):
        return
    try:
        with open(path, "rb") as f:
            head = f.read(len(q8.formats.MAGIC))
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    if head != q8.formats.MAGIC:
        raise InputError(f"{path}: not a q8 file (convert it first: q8convert {path} -o OUTPUT)")


def _decode_one(src: Path, dst_folder: Path, dst_name: str | None, args) -> list[str]:
    """Decode one q8 checkpoint into `dst_folder`; returns the file names written.

    Weights become safetensors (sharded with --max-shard-size, cast with --dtype);
    optimizer state (q8.save_optimizer's files, as Q8Trainer's optimizer.q8) an
    optimizer.pt holding the optimizer's own `state_dict()`; other nested objects (what
    q8convert made of an optimizer.pt) the torch.save file they came from. A q8 file of
    another origin is taken as weights unless `dst_name` says .pt.
    """
    _check_q8(src)
    with q8.safe_open(src) as f:
        meta = f.metadata()
    source = meta.get(SOURCE, src.name.removesuffix(INDEX_SUFFIX))
    if OPTIMIZER_KEYS & meta.keys():
        kind, name = "optimizer", dst_name or TORCH_OPTIMIZER_FILE
    elif meta.get(KIND) == "object" or (not meta.get(KIND) and Path(dst_name or "").suffix in TORCH_SUFFIXES):
        kind, name = "object", dst_name or source
    else:
        return _decode_weights(src, dst_folder, dst_name or safetensors_name(source), meta, args)
    if Path(name).suffix not in TORCH_SUFFIXES:
        raise UsageError(f"{src}: holds optimizer state or a nested object, which decodes to torch.save: name the "
                         f"output *.pt")  # fmt: skip
    if kind == "optimizer":
        state = q8.optim.load_optimizer_state_dict(src)
    else:
        state = from_container(q8.load(src))
    torch.save(state, dst_folder / name)
    return [name]


def _decode_weights(src: Path, dst_folder: Path, name: str, meta: dict[str, str], args) -> list[str]:
    """Weights into safetensors (one file, or shards + index json with --max-shard-size),
    read and written one tensor at a time. Tensors that were 8-bit codes are recorded in the
    metadata (`q8.decoded_from`, `q8.max_rel_l2`): the file is not the original."""
    if not name.endswith(".safetensors"):
        raise UsageError(f"{src}: holds weights, which decode to safetensors: name the output *.safetensors")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    with q8.safe_open(src) as f:
        infos = {k: f.info(k) for k in f.keys()}
        entries = [
            (k, dtype if dtype and i["dtype"].is_floating_point else i["dtype"], tuple(i["shape"]))
            for k, i in infos.items()
        ]
        user_meta = {k: v for k, v in meta.items() if not k.startswith("q8convert.")}
        user_meta.setdefault("format", "pt")  # Hugging Face refuses safetensors without it
        user_meta |= _lossy_metadata(infos, meta)
        shards = _safetensors_shards(entries, args.max_shard_size)
        n = len(shards)
        stem = name.removesuffix(".safetensors")
        names = [name] if n == 1 else [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        total = sum(math.prod(shape) * dt.itemsize for _, dt, shape in entries)
        with progress(total, src.name, quiet=args.quiet) as bar:
            for shard_name, shard in zip(names, shards, strict=True):
                tensors = (_decoded(f, k, dt, bar) for k, dt, _ in shard)
                write_safetensors(dst_folder / shard_name, shard, tensors, user_meta)
    if len(shards) == 1:
        return names
    weight_map = {k: shard_name for shard_name, shard in zip(names, shards, strict=True) for k, _, _ in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst_folder / f"{name}{INDEX_SUFFIX}").write_text(json.dumps(index, indent=2))
    return [*names, f"{name}{INDEX_SUFFIX}"]


def _decoded(f, name: str, dtype: torch.dtype, bar) -> torch.Tensor:
    t = f.get_tensor(name)
    bar.update(t.numel() * dtype.itemsize)
    return t if t.dtype == dtype else t.to(dtype)


def _safetensors_shards(entries: list[tuple], limit: int | None) -> list[list[tuple]]:
    """Entries in consecutive shards of at most `limit` bytes (a larger tensor alone)."""
    shards, size = [[]], 0
    for entry in entries:
        n = math.prod(entry[2]) * entry[1].itemsize
        if limit and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def _lossy_metadata(infos: dict[str, dict], meta: dict[str, str]) -> dict[str, str]:
    """What a decoded file records when some of its tensors were 8-bit codes: how many,
    and the largest relative L2 error they were stored with (as far as it was recorded)."""
    lossy = [k for k, i in infos.items() if i["encoding"] == "blockwise"]
    if not lossy:
        return {}
    choices = json.loads(meta.get("q8convert.choices", "{}"))
    errors = [float(e) for k in lossy if (e := {**choices.get(k, {}), **infos[k]["extra"]}.get("rel_l2"))]
    if len(errors) < len(lossy) and "quantized_rel_l2_max" in meta:  # save_model records the largest only
        errors.append(float(meta["quantized_rel_l2_max"]))
    recorded = f"{max(errors):.3e}" if errors else "not recorded"
    return {"q8.decoded_from": f"8-bit codes ({len(lossy)} of {len(infos)} tensors)", "q8.max_rel_l2": recorded}


def cmd_decode(args) -> int:
    src, dst = Path(args.src), Path(args.output)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    written = []
    with staged(dst, src.is_dir(), args.overwrite) as tmp:
        if src.is_dir():
            files, shards = _q8_files(src)
            if not files:
                raise InputError(f"{src}: no .q8 files in this folder")
            for p in files:
                written += _decode_one(p, tmp, None, args)
            for p in sorted(src.iterdir()):  # what decoding wrote wins (Q8Trainer's placeholder optimizer.pt)
                if p not in files and p.name not in shards and p.name not in written:
                    (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
                    written.append(p.name)
        else:
            written += _decode_one(src, tmp, dst.name, args)
    if not args.quiet:
        print(f"wrote {dst}" + (f": {', '.join(written)}" if src.is_dir() or len(written) > 1 else ""))
    return EXIT_OK


# -- info / verify -----------------------------------------------------------------------


def _info_rows(path: Path) -> list[dict]:
    with q8.safe_open(path) as f:
        choices = json.loads(f.metadata().get("q8convert.choices", "{}"))
        rows = []
        for k in f.keys():
            info = f.info(k)
            extra = {**choices.get(k, {}), **info["extra"]}
            rows.append(
                {
                    "name": k,
                    "shape": list(info["shape"]),
                    "dtype": str(info["dtype"]).removeprefix("torch."),
                    "encoding": info["encoding"],
                    "code": info["code"],
                    "blocksize": info["blocksize"],
                    "row_length": info["row_length"],
                    "raw_bytes": info["raw_bytes"],
                    "stored_bytes": info["stored_bytes"],
                    "rel_l2": float(extra["rel_l2"]) if "rel_l2" in extra else None,
                    "extra": extra,
                }
            )
        return rows


def cmd_info(args) -> int:
    path = Path(args.file)
    files = _q8_files(path)[0] if path.is_dir() else [path]
    if not all(p.exists() for p in files) or not files:
        raise InputError(f"{path}: no such q8 file")
    for p in files:
        _check_q8(p)
    per_file = {str(p): _info_rows(p) for p in files}
    raw = sum(r["raw_bytes"] for rows in per_file.values() for r in rows)
    stored = sum(r["stored_bytes"] for rows in per_file.values() for r in rows)
    if args.plot:
        try:
            drawn = plot_tradeoff([r for rows in per_file.values() for r in rows], Path(args.plot), path.name)
        except PlotUnavailable as e:
            print(f"q8convert: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if not args.json:
            print(f"wrote {args.plot}: {drawn} tensors, stored bits per element against relative L2 error")
    if args.json:
        totals = {"raw_bytes": raw, "stored_bytes": stored, "ratio": raw / stored if stored else None}
        print(json.dumps({"files": per_file, "totals": totals}, indent=2))
        return EXIT_OK
    for p, rows in per_file.items():
        print(p)
        table = []
        for r in rows:
            ratio = f"{r['raw_bytes'] / r['stored_bytes']:.2f}x" if r["stored_bytes"] else "-"
            bits = f"{8 * r['stored_bytes'] / math.prod(r['shape']):.2f}" if math.prod(r["shape"]) else "-"
            err = f"{r['rel_l2']:.2e}" if r["rel_l2"] is not None else ""
            enc = f"{r['encoding']} {r['code']}/{r['blocksize']}" if r["code"] else r["encoding"]
            if r["row_length"] is not None and r["row_length"] != math.prod(r["shape"]):
                enc += f", rows of {r['row_length']}"  # blocks restart at every row (docs/CODEC.md)
            shape = "x".join(map(str, r["shape"])) or "scalar"
            why = r["extra"].get("q8convert", "")
            table.append((r["name"], shape, r["dtype"], enc, r["stored_bytes"], ratio, bits, err, why))
        header = ("tensor", "shape", "dtype", "encoding", "stored bytes", "ratio", "bits", "rel L2", "why")
        print(_table(table, header))
    print(
        f"total: {len(files)} file(s), {fmt_bytes(raw)} -> {fmt_bytes(stored)} ({raw / stored:.2f}x)"
        if stored
        else "total: empty"
    )
    return EXIT_OK


def cmd_verify(args) -> int:
    path = Path(args.file)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    files = _q8_files(path)[0] if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no .q8 files in this folder")
    bad = 0
    for p in files:
        try:
            q8.verify(p)
            status = "OK"
        except q8.FormatError as e:
            bad += 1
            status = f"FAILED: {e}"
        if not args.quiet or bad:
            print(f"{p}: {status}")
    return EXIT_CORRUPT if bad else EXIT_OK


# -- command line ------------------------------------------------------------------------


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?", text.strip(), re.IGNORECASE)
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 500MB or 2GB, got {text!r}")
    return int(float(m.group(1)) * units[(m.group(2) or "b").lower()])


def _blocksize(text: str) -> int:
    try:
        b = int(text)
    except ValueError:
        b = 0
    if not 64 <= b <= 4096 or b & (b - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two in [64, 4096], got {text!r}")
    return b


def _model_error(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return _fraction(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive number (e.g. 0.01), got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number (relative L2 error, e.g. 0.01), got {text!r}")
    return x


COMMANDS = ("decode", "info", "verify")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    fmt = argparse.RawDescriptionHelpFormatter
    convert = argparse.ArgumentParser(
        prog="q8convert",
        description="Convert a checkpoint (file or folder) to q8. Other commands: q8convert {decode,info,verify} -h",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    convert.add_argument("src", help=".safetensors, *.index.json, .pt/.bin, or a Hugging Face model/Trainer folder")
    convert.add_argument("-o", "--output", help="destination (default: SRC with .q8)")
    convert.add_argument("--lossless", action="store_true", help="keep every tensor exact (lossless compression only)")
    targets = convert.add_mutually_exclusive_group()
    targets.add_argument(
        "--model-error",
        type=_model_error,
        metavar="E",
        help="the smallest file whose weights, all together, have a relative L2 error of at most about E: each "
        "tensor gets a share (relative errors proportional to 1/sqrt(rms): small weights a larger one, at most "
        f"{MAX_SHARE:g}E) and the smallest encoding within it. 'auto' (the default, unless --target-error, or "
        "--code or --blocksize alone, is given): E is the error the fixed encoding (--code auto, blocksize 2048) "
        "gives this model. Adam moments keep their dynamic tables at blocksize 2048",
    )
    targets.add_argument(
        "--target-error",
        type=_fraction,
        metavar="E",
        help="per tensor, the smallest encoding (code table, blocksize, or exact) whose relative L2 error is <= E, "
        "Adam moments included; one no option reaches gets the lowest-error one (or exact, if smaller)",
    )
    convert.add_argument(
        "--blocksize",
        type=_blocksize,
        help="elements per block: with a target or model error, the only blocksize tried; alone, every tensor at "
        "this blocksize with the table of lowest error (the default without a target: 2048)",
    )
    convert.add_argument(
        "--code",
        choices=("auto", "dynamic", "linear"),
        help="tables for weights: with a target or model error, the only family tried (linear: 127 levels down to "
        "8); alone, that table at one blocksize (auto: the lower-error of dynamic and linear)",
    )
    convert.add_argument(
        "--keep", action="append", default=[], metavar="GLOB", help="keep tensors whose name matches exact (repeatable)"
    )
    convert.add_argument(
        "--max-error",
        type=_fraction,
        metavar="X",
        help="keep a tensor exact if the error of the encoding chosen would exceed X (a hard limit; "
        "the target is a soft one)",
    )
    convert.add_argument(
        "--quantize-weights",
        action="store_true",
        help="in a Trainer checkpoint, quantize the model weights too (by default they stay exact there, so that "
        "a resume is exact; a model folder's weights are quantized)",
    )
    convert.add_argument("--max-shard-size", type=_size, metavar="SIZE", help="split the weights, e.g. 5GB")
    convert.add_argument("--dry-run", action="store_true", help="decide and measure everything, write nothing")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")
    convert.add_argument("--json", action="store_true", help="print the report as JSON")
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress, no report")
    convert.add_argument("--version", action="version", version=f"q8convert {q8.__version__}")
    convert.set_defaults(func=cmd_convert)

    decode = argparse.ArgumentParser(
        prog="q8convert decode",
        formatter_class=fmt,
        description="Decode a q8 file or folder back to safetensors / optimizer.pt.",
        epilog="example:\n  q8convert decode ./checkpoint-500.q8 -o ./checkpoint-500-restored",
    )
    decode.add_argument("src", help="a .q8 file, a *.q8.index.json, or a folder written by q8convert")
    decode.add_argument("-o", "--output", required=True, help="destination file (.safetensors, .pt) or folder")
    decode.add_argument(
        "--max-shard-size", type=_size, metavar="SIZE", help="split decoded weights into safetensors shards, e.g. 5GB"
    )
    decode.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), help="float weights in this dtype (default: as saved)"
    )
    decode.add_argument("--overwrite", action="store_true", help="replace an existing output")
    decode.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    decode.set_defaults(func=cmd_decode)

    info = argparse.ArgumentParser(
        prog="q8convert info",
        description="Per tensor: shape, dtype, encoding, bytes, ratio, error.",
        epilog="examples:\n  q8convert info model.q8 --json\n  q8convert info model.q8 --plot tradeoff.png",
        formatter_class=fmt,
    )
    info.add_argument("file", help="a .q8 file, *.q8.index.json or folder")
    info.add_argument("--json", action="store_true")
    info.add_argument(
        "--plot",
        metavar="PNG",
        help="draw each quantized tensor's stored bits per element against its relative L2 error, by layer "
        "(needs matplotlib: pip install 'q8[plot]')",
    )
    info.set_defaults(func=cmd_info)

    verify = argparse.ArgumentParser(
        prog="q8convert verify",
        description="Check every checksum. Exit code 1 if one fails.",
        epilog="example:\n  q8convert verify model.q8",
        formatter_class=fmt,
    )
    verify.add_argument("file", help="a .q8 file, *.q8.index.json or folder")
    verify.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    verify.set_defaults(func=cmd_verify)
    return {"convert": convert, "decode": decode, "info": info, "verify": verify}


def main(argv: list[str] | None = None) -> int:
    """Run q8convert with `argv` (default: sys.argv[1:]); returns the exit code. SIGINT and
    SIGTERM stop it cleanly (temporary output removed) with exit code 130 / 143."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "convert"
    try:
        args = _parsers()[command].parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    handle = threading.current_thread() is threading.main_thread()  # where Python delivers signals
    previous = signal.signal(signal.SIGTERM, _terminate) if handle else None
    try:
        return args.func(args)
    except InputError as e:
        print(f"q8convert: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except q8.FormatError as e:
        print(f"q8convert: error: {e}", file=sys.stderr)
        return EXIT_CORRUPT
    except OutputError as e:
        print(f"q8convert: error: {e}", file=sys.stderr)
        return EXIT_OUTPUT
    except UsageError as e:
        print(f"q8convert: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:
        path = e.filename or getattr(args, "output", None)  # a write error (disk full) names no file
        where = f"{path}: " if path else ""
        print(f"q8convert: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_OUTPUT
    except KeyboardInterrupt:
        print("q8convert: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("q8convert: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
