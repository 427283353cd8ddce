"""q8.optim: 8-bit optimizers whose state is blockwise codes + absmax (see README.md).

Drop-in replacements for torch.optim: `Adam8bit`, `AdamW8bit`, `SGD8bit`, `Lion8bit`,
`RMSprop8bit`, `Adagrad8bit`, `LAMB8bit`, `LARS8bit`; `StableEmbedding` for language
models; `override_32bit(param)` to keep one parameter's state in fp32;
`save_optimizer` / `async_save_optimizer` / `load_optimizer` (also at `q8.`) for the q8
container, and `load_optimizer_state_dict` (a saved state as the optimizer's `state_dict()`).
"""

from .algorithms import Adagrad8bit, Adam8bit, AdamW8bit, LAMB8bit, LARS8bit, Lion8bit, RMSprop8bit, SGD8bit
from .embedding import StableEmbedding
from .optimizer import Optimizer8bit, override_32bit
from .persist import async_save_optimizer, load_optimizer, load_optimizer_state_dict, save_optimizer

__all__ = [
    "Adagrad8bit",
    "Adam8bit",
    "AdamW8bit",
    "LAMB8bit",
    "LARS8bit",
    "Lion8bit",
    "Optimizer8bit",
    "RMSprop8bit",
    "SGD8bit",
    "StableEmbedding",
    "async_save_optimizer",
    "load_optimizer",
    "load_optimizer_state_dict",
    "override_32bit",
    "save_optimizer",
]
