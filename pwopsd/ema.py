"""The EMA teacher (train.py --teacher ema): a second, frozen LoRA adapter of the same network that follows the
student, theta_T <- decay * theta_T + (1 - decay) * theta_S after every optimizer step (OPSD's EMA variant)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pwopsd.cli import fail

PROG = "train.py"
EMA_ADAPTER = "ema"  # peft adapter name of the EMA teacher; the student is peft's "default"


# ALGORITHM (option): the EMA teacher (--teacher ema), a second LoRA adapter of the same network
def add_ema_teacher(model, lora_config) -> None:
    """Add the frozen peft adapter ``EMA_ADAPTER`` to ``model`` (a ``PeftModel``), equal to the student's
    ``default`` adapter.

    At step 0 the EMA teacher therefore is the student, whose LoRA B = 0 makes it the initial policy -- the
    paper's teacher. Only LoRA tensors are added (r x (d_in + d_out) per adapted layer), never a second copy of
    the model; the student adapter stays the active, trainable one. Call before the optimizer is built.
    """
    import copy

    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the run's RNG stream as it was
        model.add_adapter(EMA_ADAPTER, copy.deepcopy(lora_config))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if f".{EMA_ADAPTER}." in name:
                p.requires_grad_(False)
                p.copy_(params[name.replace(f".{EMA_ADAPTER}.", ".default.")])


def ema_state(net) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(name, EMA tensor, student tensor, float32 master)`` for every LoRA tensor of the EMA adapter of the
    unwrapped ``net`` (after ``accelerator.prepare``, which may cast the module).

    The master is the EMA tensor itself when that is float32, else a float32 copy: with decay 0.999 one step
    moves the teacher by 0.1 % of its distance to the student, below bfloat16's resolution (~0.4 %), so an EMA
    kept in bfloat16 would not move at all.
    """
    params = dict(net.named_parameters())
    out = []
    for name, e in params.items():
        if f".{EMA_ADAPTER}." in name:
            s = params[name.replace(f".{EMA_ADAPTER}.", ".default.")]
            out.append((name, e, s, e if e.dtype == torch.float32 else e.detach().float().clone()))
    if not out:
        raise ValueError(f"ema_state: the model has no '{EMA_ADAPTER}' adapter (add_ema_teacher first)")
    return out


@torch.no_grad()
def update_ema_teacher(ema: list, decay: float):
    """theta_T <- decay * theta_T + (1 - decay) * theta_S for every LoRA tensor, in float32, after each optimizer
    step (the mean-teacher update; OPSD's EMA variant). decay 1 keeps the initial policy, 0 is the live student."""
    for _, e, s, m in ema:
        m.mul_(decay).add_(s.detach().float(), alpha=1 - decay)
        if m is not e:
            e.copy_(m)


def save_ema_teacher(ema: list, folder: Path, adapter_config: Path):
    """The float32 EMA adapter as a peft adapter folder (loadable by peft and evaluate.py; exact on resume)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({n.replace(f".{EMA_ADAPTER}.", "."): m.detach().cpu().contiguous() for n, _, _, m in ema},
              str(folder / "adapter_model.safetensors"))
    shutil.copy(adapter_config, folder / "adapter_config.json")


@torch.no_grad()
def load_ema_teacher(ema: list, folder: Path):
    """Restore what ``save_ema_teacher`` wrote into the masters and the EMA adapter; exits naming a missing tensor."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / "adapter_model.safetensors"))
    for name, e, _, m in ema:
        key = name.replace(f".{EMA_ADAPTER}.", ".")
        if key not in saved:
            fail(PROG, f"{folder}: no tensor {key} (a checkpoint of another LoRA configuration?)")
        m.copy_(saved[key])
        if m is not e:
            e.copy_(m)
