"""The one U(0, 1) draw behind every noise mask (diffusion objective and RL estimators).

A neutral module so the CPT/SFT objective (`diffusion.py`) and the RL estimators (`rl/`) share it
without either importing the other.
"""

import torch


def uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """U(0, 1) of `shape` on `device`, drawn where the generator lives (a CPU noise stream serves GPU
    batches and gives the same draws on any device); without a generator, from `device`'s global RNG."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)
