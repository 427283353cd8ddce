"""Write the fixtures of 8-bit optimizer state as q8 saved it before the row layout (flat
blocks over each whole parameter, 1-D parameters in 8 bits too), for
tests/test_optim_persist.py::test_state_of_the_previous_release_loads.

- previous_release_adamw8bit.pt: torch.save of {"params": [...], "state_dict": ...}
- previous_release_adamw8bit.q8: q8.save_optimizer of the same optimizer

Run with that release's q8 on the path (it was made from commit 6b5199c):
    PYTHONSAFEPATH=1 PYTHONPATH=<folder holding that q8> python tests/data/make_previous_release_state.py
"""

from pathlib import Path

import q8
import torch

HERE = Path(__file__).parent
OPTIONS = {"lr": 1e-2, "blocksize": 64, "min_8bit_size": 128}


def main() -> None:
    torch.manual_seed(0)
    # Weights of 16x64 (rows of one whole block), 24x16 and 130x24 (rows that cut blocks), and
    # a 130-element bias, 8-bit in that release.
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Linear(16, 24), torch.nn.Linear(24, 130))
    opt = q8.optim.AdamW8bit(model.parameters(), **OPTIONS)
    for _ in range(2):
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    torch.save({"params": params, "state_dict": opt.state_dict()}, HERE / "previous_release_adamw8bit.pt")
    q8.save_optimizer(opt, HERE / "previous_release_adamw8bit.q8")


if __name__ == "__main__":
    main()
