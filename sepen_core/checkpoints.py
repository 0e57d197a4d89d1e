"""Resumable training runs: per-step seeds and checkpoints, for SepEn finetuning and toy-world base training.

A checkpoint holds named parameters with their AdamW moments (and any extra tensors) as
safetensors, plus a JSON state that names them, switched atomically so a crash never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "checkpoint.json"


def step_seed(seed: int, step: int) -> int:
    """Each step draws from its own seed, so a resumed run replays exactly what it would have drawn."""
    return (seed * 1_000_003 + step * 7_919) % (2**63)


def write_checkpoint(
    directory: Path,
    step: int,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    state: dict,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save params as weight/<name>, AdamW moments as exp_avg/, exp_avg_sq/, step/ (for the params that
    have them: a param that never got a gradient has none), `extra` as given; then `state` (JSON)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}
    for name, p in params.items():
        tensors[f"weight/{name}"] = p.detach().cpu().contiguous()
        moments = optimizer.state.get(p)
        if moments:
            tensors[f"exp_avg/{name}"] = moments["exp_avg"].cpu().contiguous()
            tensors[f"exp_avg_sq/{name}"] = moments["exp_avg_sq"].cpu().contiguous()
            tensors[f"step/{name}"] = moments["step"].reshape(1).cpu()
    tensor_file = f"checkpoint-{step:07d}.safetensors"
    save_file(tensors, str(directory / (tensor_file + ".tmp")))
    os.replace(directory / (tensor_file + ".tmp"), directory / tensor_file)
    (directory / (STATE_FILE + ".tmp")).write_text(json.dumps({**state, "step": step, "tensors": tensor_file}))
    os.replace(directory / (STATE_FILE + ".tmp"), directory / STATE_FILE)
    for old in directory.glob("checkpoint-*.safetensors"):
        if old.name != tensor_file:
            old.unlink()


def read_checkpoint_state(directory: Path) -> dict | None:
    """The JSON state of the checkpoint in `directory`, or None when there is none."""
    state_file = directory / STATE_FILE
    return json.loads(state_file.read_text()) if state_file.exists() else None


def restore_checkpoint(
    directory: Path, state: dict, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """Load weights and AdamW moments named by `state` into params and optimizer; returns all tensors
    (for the caller's extras)."""
    tensors = load_file(str(directory / state["tensors"]))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"weight/{name}"].to(p))
            if f"exp_avg/{name}" in tensors:
                optimizer.state[p] = {
                    "step": tensors[f"step/{name}"].reshape(()).clone(),
                    "exp_avg": tensors[f"exp_avg/{name}"].to(p),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p),
                }
    return tensors
