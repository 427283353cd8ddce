"""Hugging Face Trainer integration.

Two pieces, both clients of the public q8 API:

- `q8_optimizer_cls_and_kwargs(name, args, model)`: a q8 8-bit optimizer for any `transformers.Trainer`
  through its `optimizer_cls_and_kwargs` argument, with the hyperparameters of `TrainingArguments` and
  32-bit state for embedding tables (the Trainer does the same for bitsandbytes' 8-bit optimizers).
- `Q8Trainer`: a drop-in `Trainer` whose checkpoints keep the optimizer state in `optimizer.q8` (8-bit
  state as is, fp32 state losslessly unless asked to quantize it), optionally the model weights in
  `model.q8`, and whose resume fails loudly instead of silently restarting the optimizer from zero.

Importing this module imports transformers; `import q8` never does.
"""

from __future__ import annotations

import inspect
import logging
import os
import secrets
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import q8
import q8.optim
import torch
from q8.formats.atomic import fsync_dir, make_temp_dir, remove_stale_matching
from q8.formats.background import save_in_background
from q8.formats.checkpoints import Q8_MODEL_FILE, Q8_OPTIMIZER_FILE, SCHEDULER_FILE, TORCH_OPTIMIZER_FILE
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.trainer_utils import rotate_checkpoints
from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

__all__ = [
    "Q8Trainer",
    "load_model_weights",
    "load_optimizer_state",
    "q8_optimizer_cls_and_kwargs",
    "save_model_weights",
    "save_optimizer_state",
]

logger = logging.getLogger(__name__)

# The layout of a Q8Trainer checkpoint (q8.formats.checkpoints): optimizer.q8 with a placeholder optimizer.pt,
# scheduler.pt as transformers writes it, and with model_weights="q8" | "q8-8bit" the weights in model.q8.
OPTIMIZER_FILE = Q8_OPTIMIZER_FILE
MODEL_FILE = Q8_MODEL_FILE
MODEL_WEIGHTS = ("safetensors", "q8", "q8-8bit")

# Name -> class name in q8.optim. The names follow bitsandbytes' (AdamW8bit -> "adamw8bit").
OPTIMIZERS = {
    "adam8bit": "Adam8bit",
    "adamw8bit": "AdamW8bit",
    "lion8bit": "Lion8bit",
    "sgd8bit": "SGD8bit",
    "rmsprop8bit": "RMSprop8bit",
    "adagrad8bit": "Adagrad8bit",
    "lamb8bit": "LAMB8bit",
    "lars8bit": "LARS8bit",
}


def q8_optimizer_cls_and_kwargs(
    name: str, args: TrainingArguments, model: torch.nn.Module | None = None, *, embeddings_32bit: bool = True
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The `(cls, kwargs)` pair for `Trainer(optimizer_cls_and_kwargs=...)` that trains with a q8 8-bit optimizer.

    The Trainer itself splits the parameters into a weight-decay group (`args.weight_decay`) and a no-decay
    group (biases, norms); this adds `lr`, the betas and eps (Adam, AdamW, LAMB; betas only for Lion) from
    `args`, and any `args.optim_args` ("momentum=0.9,alpha=0.99") the optimizer accepts.

    Args:
        name: one of `OPTIMIZERS` ("adamw8bit", "adam8bit", "lion8bit", "sgd8bit", "rmsprop8bit",
            "adagrad8bit", "lamb8bit", "lars8bit"), case-insensitive.
        args: the `TrainingArguments` the Trainer is built with.
        model: the model to train; needed for `embeddings_32bit`.
        embeddings_32bit: keep the optimizer state of every `nn.Embedding` weight of `model` in 32 bits
            (`q8.optim.override_32bit`), as the Trainer does for bitsandbytes' 8-bit optimizers and the
            8-bit optimizers paper recommends for language models.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds,
        ...                   optimizer_cls_and_kwargs=q8_optimizer_cls_and_kwargs("adamw8bit", args, model))
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown q8 optimizer {name!r}: expected one of {sorted(OPTIMIZERS)}")
    cls = getattr(q8.optim, OPTIMIZERS[key])
    accepted = {  # the optimizer's own arguments and those every q8 optimizer takes
        **inspect.signature(q8.optim.Optimizer8bit.__init__).parameters,
        **inspect.signature(cls.__init__).parameters,
    }
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    if "betas" in accepted:
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
        if "eps" in accepted:
            kwargs["eps"] = args.adam_epsilon
    kwargs.update(_parse_optim_args(args.optim_args, cls, accepted))
    if embeddings_32bit:
        if model is None:
            raise ValueError("q8_optimizer_cls_and_kwargs: embeddings_32bit=True needs the model (or pass False)")
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                q8.optim.override_32bit(module.weight)
    return cls, kwargs


def _parse_optim_args(optim_args: str | None, cls: type, accepted: dict[str, inspect.Parameter]) -> dict[str, Any]:
    """`TrainingArguments.optim_args` ("k=v,k=v") as keyword arguments of `cls`, typed like their defaults."""
    parsed: dict[str, Any] = {}
    for item in (optim_args or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, text = item.partition("=")
        if not sep or key not in accepted or key in ("self", "params", "defaults", "options", "unsupported"):
            raise ValueError(f"optim_args: {item!r} is not a `key=value` keyword argument of {cls.__name__}")
        default = accepted[key].default
        if isinstance(default, bool):
            parsed[key] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            parsed[key] = int(text)
        elif isinstance(default, tuple):
            parsed[key] = tuple(float(v) for v in text.split(":"))
        else:
            parsed[key] = float(text)
    return parsed


save_optimizer_state = q8.save_optimizer
"""What Q8Trainer does with `optimizer.q8` (`q8.save_optimizer`: any optimizer), for your own loops."""
load_optimizer_state = q8.load_optimizer
"""What Q8Trainer does with `optimizer.q8` on resume (`q8.load_optimizer`)."""
save_model_weights = q8.save_model
"""What Q8Trainer(model_weights="q8" | "q8-8bit") does with `model.q8` (`q8.save_model`)."""
load_model_weights = q8.load_model
"""What Q8Trainer does with `model.q8` on resume (`q8.load_model`, strict)."""


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """One line for the training log: the optimizer, which parameters get 8-bit state, and
    the size of the state once every parameter has stepped."""
    params = [(p, g) for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if not isinstance(optimizer, q8.optim.Optimizer8bit):
        return f"optimizer: {type(optimizer).__name__}, {len(params)} parameters (its own state, not 8-bit)"
    eight, nbytes, fp32_bytes = 0, 0, 0
    for p, group in params:
        entries = len(optimizer.state_codes(group))
        fp32_bytes += entries * 4 * p.numel()
        if optimizer.is_8bit(p, group):
            eight += 1
            rows, k = q8.optim.optimizer.absmax_shape(p, optimizer.blocksize)
            nbytes += entries * (p.numel() + 4 * rows * k)
        else:
            nbytes += entries * 4 * p.numel()
    return (
        f"optimizer: q8 {type(optimizer).__name__}, 8-bit state for {eight} of {len(params)} parameters, "
        f"{nbytes / 1e6:.1f} MB of state ({fp32_bytes / 1e6:.1f} MB in fp32)"
    )


def resume_requires_q8trainer(optimizer_file: str) -> None:
    """Raise: called when `torch.load` reads the placeholder `optimizer.pt` of a Q8Trainer checkpoint."""
    raise RuntimeError(
        f"this checkpoint keeps its optimizer state in {optimizer_file}, which transformers.Trainer cannot read: "
        "resume it with q8.integrations.hf.Q8Trainer. Its optimizer.pt is only a placeholder that makes a plain "
        "Trainer fail here instead of silently restarting the optimizer from zero."
    )


class _PlaceholderOptimizerState:
    """What `Q8Trainer` pickles as `optimizer.pt`: unpickling it calls `resume_requires_q8trainer`."""

    def __reduce__(self):
        return resume_requires_q8trainer, (OPTIMIZER_FILE,)


# Loaded with weights_only=True (as transformers does), the placeholder fails at once with an error naming
# `q8.integrations.hf.resume_requires_q8trainer`; once this module is imported the call is allowed and
# raises the explanation above. The function only raises, so allowing it is safe.
torch.serialization.add_safe_globals([resume_requires_q8trainer])


class Q8Trainer(Trainer):
    """A drop-in `transformers.Trainer` that keeps checkpoint optimizer state in q8 files.

    Each checkpoint gets `optimizer.q8` instead of the Trainer's `optimizer.pt`; scheduler, RNG, trainer
    state and model files are written as the Trainer writes them. `optimizer.pt` becomes a small
    placeholder that makes a plain `Trainer` fail on resume (it would otherwise skip the missing state
    without a word). On `train(resume_from_checkpoint=...)` the state is loaded back exactly; a checkpoint
    without optimizer or scheduler state, or with state for other parameters, raises an error naming the file.
    Checkpoints of a plain Trainer (`optimizer.pt`) resume as the Trainer would.

    DeepSpeed, FSDP, XLA and SageMaker model parallelism save their own sharded optimizer state: under
    them Q8Trainer behaves exactly like Trainer.

    Args (besides the Trainer's):
        q8_optim: train with this q8 8-bit optimizer ("adamw8bit", ...; see `q8_optimizer_cls_and_kwargs`)
            instead of `args.optim`.
        embeddings_32bit: with `q8_optim`, keep embedding weights' optimizer state in 32 bits.
        quantize_optimizer_state: store the state of a non-q8 (fp32) optimizer as 8-bit codes, about 4x
            smaller; a one-time loss at each save, logged with its error. q8 optimizers' state is 8-bit
            already and always stored as is.
        compress_optimizer_codes: entropy-code the 8-bit optimizer state in `optimizer.q8`
            (`q8.save_optimizer(compress_codes=True)`): 4-12% smaller files here, slower saves and loads.
        model_weights: how checkpoints store the model: "safetensors" (the Trainer's files), "q8"
            (`model.q8`, lossless, resume exact) or "q8-8bit" (`model.q8`, 8-bit codes, about 4x smaller;
            a resume continues from the quantized weights; the error is logged). Only checkpoints:
            `trainer.save_model()` still writes files `from_pretrained` reads.
        async_save: a checkpoint returns to training once the model and optimizer state are copied; they
            are written (and quantized, if asked) on q8's save thread into a hidden staging folder that is
            renamed to `checkpoint-<step>` once every file is complete, so rotation (`save_total_limit`),
            `load_best_model_at_end` and resume only ever see complete checkpoints. The next checkpoint, the
            end of training and the interpreter's exit wait for it; a failed write raises there. Single
            process only (no DeepSpeed/FSDP/DDP), and not with `push_to_hub`.
    """

    def __init__(
        self,
        *args: Any,
        q8_optim: str | None = None,
        embeddings_32bit: bool = True,
        quantize_optimizer_state: bool = False,
        compress_optimizer_codes: bool = False,
        model_weights: str = "safetensors",
        async_save: bool = False,
        **kwargs: Any,
    ) -> None:
        if model_weights not in MODEL_WEIGHTS:
            raise ValueError(f"Q8Trainer: model_weights must be one of {MODEL_WEIGHTS}, got {model_weights!r}")
        refused = ValueError(
            "Q8Trainer: async_save=True needs a single process without push_to_hub, DeepSpeed or FSDP "
            "(their checkpoints are written by other code); use async_save=False"
        )
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if async_save and training_args is not None and (training_args.push_to_hub or training_args.world_size > 1):
            raise refused  # before the Trainer creates a Hub repository
        if q8_optim is not None and (not isinstance(q8_optim, str) or q8_optim.lower() not in OPTIMIZERS):
            raise ValueError(f"Q8Trainer: unknown q8_optim {q8_optim!r}: expected one of {sorted(OPTIMIZERS)}")
        super().__init__(*args, **kwargs)
        if async_save and self._saves_its_own_optimizer_state():
            raise refused
        if q8_optim is not None and (self.optimizer is not None or self.optimizer_cls_and_kwargs is not None):
            raise ValueError(
                "Q8Trainer: pass q8_optim or an optimizer (optimizers, optimizer_cls_and_kwargs), not both"
            )
        if q8_optim is not None:  # the hyperparameters too (args.optim_args), now rather than in train()
            q8_optimizer_cls_and_kwargs(q8_optim, self.args, embeddings_32bit=False)
        self.q8_optim = q8_optim
        self.embeddings_32bit = embeddings_32bit
        self.quantize_optimizer_state = quantize_optimizer_state
        self.compress_optimizer_codes = compress_optimizer_codes
        self.model_weights = model_weights
        self.async_save = async_save
        self._saving_checkpoint = False
        self._checkpoint: _AsyncCheckpoint | None = None  # the one being saved now, with async_save
        self._pending_checkpoint: _AsyncCheckpoint | None = None  # the last one saved, maybe still writing

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        created = self.optimizer is None
        if self.q8_optim is not None and created:
            self.optimizer_cls_and_kwargs = q8_optimizer_cls_and_kwargs(
                self.q8_optim, self.args, self.model if model is None else model, embeddings_32bit=self.embeddings_32bit
            )
        optimizer = super().create_optimizer(model)
        if created:
            logger.info(describe_optimizer(getattr(optimizer, "optimizer", optimizer)))
        return optimizer

    def _saves_its_own_optimizer_state(self) -> bool:
        """True where the parent's distributed engines write (sharded) optimizer state themselves."""
        return (
            self.is_deepspeed_enabled or self.is_fsdp_enabled or is_torch_xla_available() or is_sagemaker_mp_enabled()
        )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._saves_its_own_optimizer_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        checkpoint = self._checkpoint
        folder = checkpoint.staging if checkpoint else output_dir
        path = os.path.join(folder, OPTIMIZER_FILE)
        options = {"quantize": self.quantize_optimizer_state, "compress_codes": self.compress_optimizer_codes}
        if checkpoint:
            checkpoint.futures.append(q8.async_save_optimizer(optimizer, path, **options))
        else:
            q8.save_optimizer(optimizer, path, **options)
        torch.save(_PlaceholderOptimizerState(), os.path.join(folder, TORCH_OPTIMIZER_FILE))
        with warnings.catch_warnings(record=True) as caught_warnings:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(folder, SCHEDULER_FILE))
        reissue_pt_warnings(caught_warnings)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or self._saves_its_own_optimizer_state():
            return super()._load_optimizer_and_scheduler(checkpoint)
        q8_file = os.path.join(checkpoint, OPTIMIZER_FILE)
        torch_file = os.path.join(checkpoint, TORCH_OPTIMIZER_FILE)
        scheduler_file = os.path.join(checkpoint, SCHEDULER_FILE)
        if not (os.path.isfile(q8_file) or os.path.isfile(torch_file)):
            raise FileNotFoundError(
                f"cannot resume from {checkpoint}: it has no optimizer state ({OPTIMIZER_FILE} or "
                f"{TORCH_OPTIMIZER_FILE}), so training would silently restart the optimizer from zero "
                "(written with save_only_model=True?)"
            )
        if not os.path.isfile(scheduler_file):
            raise FileNotFoundError(
                f"cannot resume from {checkpoint}: {SCHEDULER_FILE} is missing, so the learning-rate schedule would "
                "silently restart from zero"
            )
        if not os.path.isfile(q8_file):
            return super()._load_optimizer_and_scheduler(checkpoint)  # a plain Trainer's checkpoint
        q8.load_optimizer(getattr(self.optimizer, "optimizer", self.optimizer), q8_file)
        with warnings.catch_warnings(record=True) as caught_warnings:
            self.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
        reissue_pt_warnings(caught_warnings)

    def _writes_q8_model(self) -> bool:
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return (
            self._saving_checkpoint
            and self.model_weights != "safetensors"
            and isinstance(unwrapped, PreTrainedModel)
            and not self._saves_its_own_optimizer_state()
        )

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        self._saving_checkpoint = True
        try:
            if self.async_save:
                self._save_checkpoint_async(model, trial)
            else:
                super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _save_checkpoint_async(self, model: torch.nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, its model and optimizer files written in the background into a staging
        folder (`_AsyncCheckpoint`); the Trainer's own small files are written now and moved there. Rotation
        runs once the checkpoint is complete."""
        self._wait_for_checkpoint()
        run_dir = self._get_output_dir(trial=trial)
        self._checkpoint = checkpoint = _AsyncCheckpoint(os.path.join(run_dir, f"checkpoint-{self.state.global_step}"))
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotation: once complete
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            checkpoint.abandon()
            raise
        finally:
            self.args.save_total_limit = limit
            self._checkpoint = None
        best = self.state.best_model_checkpoint
        checkpoint.complete(lambda: rotate_checkpoints(run_dir, limit, best, use_mtime=True))
        self._pending_checkpoint = checkpoint

    def _wait_for_checkpoint(self) -> None:
        """Block until the last asynchronous checkpoint is complete; raise if writing it failed."""
        checkpoint, self._pending_checkpoint = self._pending_checkpoint, None
        if checkpoint is not None:
            checkpoint.wait()

    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        self._wait_for_checkpoint()  # before the best model is loaded and checkpoints are deleted
        return super()._finalize_training(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        checkpoint, q8_weights = self._checkpoint, self._writes_q8_model()
        if checkpoint is None:
            return self._write_model(output_dir, state_dict, q8_weights)
        os.makedirs(output_dir, exist_ok=True)  # the Trainer looks for it (best checkpoint)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        weights = state_dict if state_dict is not None else model.state_dict()
        folder = checkpoint.staging
        checkpoint.futures.append(
            save_in_background(folder, lambda copy: self._write_model(folder, copy, q8_weights), weights)
        )

    def _write_model(self, output_dir: str | None, state_dict: dict | None, q8_weights: bool) -> None:
        """What `Trainer._save` writes; with `q8_weights`, `model.q8` instead of the Trainer's weights."""
        if not q8_weights:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        weights = state_dict if state_dict is not None else model.state_dict()
        q8.save_model(weights, os.path.join(output_dir, MODEL_FILE), quantize=self.model_weights == "q8-8bit")
        model.config.save_pretrained(output_dir)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        path = os.path.join(resume_from_checkpoint, MODEL_FILE)
        if not os.path.isfile(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        q8.load_model(self.model if model is None else model, path)

    def _load_best_model(self) -> None:
        self._wait_for_checkpoint()
        path = os.path.join(self.state.best_model_checkpoint, MODEL_FILE)
        if not os.path.isfile(path):
            return super()._load_best_model()
        q8.load_model(self.model, path)


class _AsyncCheckpoint:
    """A checkpoint folder written in the background (`Q8Trainer(async_save=True)`).

    Files go into a locked staging folder next to `final` (`.checkpoint-<step>.<pid>.<random>.tmp`, hidden
    from the Trainer's `checkpoint-*` patterns; a later checkpoint removes one left by a killed process).
    `complete()` moves in what was written to `final` meanwhile and queues, on the save thread behind the
    checkpoint's own saves, the rename of the staging folder to `final` and then `after()` (rotation)."""

    def __init__(self, final: str) -> None:
        self.final = final
        remove_stale_matching(Path(final).parent, rb"checkpoint-\d+")
        staging, self._lock = make_temp_dir(Path(final), secrets.token_hex(4))
        self.staging = str(staging)
        self.futures: list[q8.formats.SaveFuture] = []

    def complete(self, after: Callable[[], None]) -> None:
        if os.path.isdir(self.final):
            for name in os.listdir(self.final):
                os.replace(os.path.join(self.final, name), os.path.join(self.staging, name))
            os.rmdir(self.final)

        saves = list(self.futures)

        def finish(_: Any) -> None:  # on the save thread, after the checkpoint's saves
            errors = [e for e in (f.exception() for f in saves) if e is not None]
            if errors:
                self._discard()
                raise errors[0]
            os.replace(self.staging, self.final)
            fsync_dir(Path(self.final).parent)
            os.close(self._lock)
            after()

        self.futures.append(save_in_background(self.final, finish))

    def abandon(self) -> None:
        """Remove the staging folder once the saves writing into it are done (the checkpoint failed)."""
        wait_futures(self.futures)
        self._discard()

    def _discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        os.close(self._lock)

    def wait(self) -> None:
        for future in self.futures:
            try:
                future.result()
            except Exception as e:
                raise RuntimeError(f"the asynchronous save of {self.final} failed: {e}") from e
