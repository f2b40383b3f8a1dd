"""Processes and sharding: the accelerate set-up of a launch, the checks that it is what the accelerate config asks
for (DDP, DeepSpeed ZeRO, FSDP), and that a checkpoint is resumed under the sharding it was saved with."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pwopsd.cli import fail, resolve_dtype
from pwopsd.folders import loadable_checkpoint

PROG = "train.py"
def build_accelerator(args):
    """``(Accelerator, gradient accumulation steps)`` for this launch; exits if the batch does not split."""
    from accelerate import Accelerator, PartialState

    on_gpu, env = torch.cuda.is_available(), os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        print("[train] note: `accelerate launch --cpu --num_processes N` starts ONE process (accelerate's CPU launcher "
              "needs MPI for more). For N CPU processes: accelerate launch --multi_gpu --num_processes N train.py ...")
    # No CUDA: cpu=True makes the launched processes a gloo group -- but then accelerate skips DeepSpeed and runs
    # plain DDP, silently. So under DeepSpeed: cpu=False with a gloo backend, which builds the DeepSpeed engine on
    # DeepSpeed's CPU accelerator.
    ds_on_cpu = not on_gpu and env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and "LOCAL_RANK" in env
    cpu = not on_gpu and not ds_on_cpu
    world = PartialState(cpu=cpu, **({"backend": "gloo"} if ds_on_cpu else {})).num_processes
    micro = args.per_device_train_batch_size
    # Prompts are split over processes; each process's prompts x num_generations rollouts over its micro-batches.
    rollouts, g = args.batch_size * args.num_generations, args.num_generations
    if args.batch_size % world:
        fail(PROG, f"--batch_size {args.batch_size} (prompts) is not divisible by the {world} processes")
    if rollouts % (micro * world):
        what = f"--batch_size {args.batch_size}" if g == 1 else f"--batch_size x --num_generations = {args.batch_size} x {g}"
        fail(PROG, f"{what} is not divisible by --per_device_train_batch_size x processes = {micro} x {world}")
    grad_accum = rollouts // (micro * world)
    bf16 = on_gpu and resolve_dtype(args.dtype) == torch.bfloat16
    accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", gradient_accumulation_steps=grad_accum,
                              log_with=None if args.report_to == "none" else args.report_to, project_dir=args.output_dir)
    check_distributed(args, accelerator)
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:  # no dataloader: tell DeepSpeed the batch geometry; it clips gradients itself
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=grad_accum,
                                   gradient_clipping=args.max_grad_norm)
    return accelerator, grad_accum


def check_distributed(args, accelerator):
    """Exit with one line when accelerate did not set up what the accelerate config asks for -- FSDP without
    GPUs: accelerate 1.15 enables it only on GPU-type backends and otherwise runs plain DDP, silently -- or when
    ZeRO-3 / FSDP meet a run that needs whole tensors."""
    env, built = os.environ, accelerator.distributed_type.name
    for wanted, why in (("DEEPSPEED", ""), ("FSDP", ": accelerate 1.15 enables FSDP only with GPUs (without, use "
                                                    "configs/accelerate/ddp.yaml, zero2.yaml or zero3.yaml)")):
        if env.get(f"ACCELERATE_USE_{wanted}", "").lower() == "true" and built != wanted:
            fail(PROG, f"the accelerate config asks for {wanted} but accelerate set up {built}{why}")
    ds = accelerator.state.deepspeed_plugin
    sharded = (ds is not None and ds.zero_stage == 3) or built == "FSDP"
    if sharded and args.teacher == "ema":
        fail(PROG, "--teacher ema with ZeRO-3 / FSDP: the EMA update reads whole LoRA tensors; use ZeRO-2 / DDP")
    if sharded and not args.use_lora:
        fail(PROG, "--use_lora false with ZeRO-3 / FSDP: the frozen teacher copy and the lm_head used by the loss "
                   "cannot be sharded; use LoRA (the teacher is then the adapter-disabled student) or ZeRO-2 / DDP")


def find_checkpoint(args, accelerator) -> str | None:
    """The checkpoint folder to resume from (``latest`` = the newest complete one that loads), or None. Exits with one
    line when it was saved under another sharding than this launch's: accelerate cannot load a DeepSpeed checkpoint
    without DeepSpeed or the reverse, and DeepSpeed cannot re-split ZeRO optimizer state over another number of
    processes."""
    found = args.resume_from_checkpoint
    if found == "latest":
        found = loadable_checkpoint(args.output_dir, accelerator.print)  # damaged ones skipped, each with a line
        if found is None:
            accelerator.print(f"[train] --resume_from_checkpoint latest: no checkpoint in {args.output_dir}; starting fresh")
    if found is not None and checkpoint_sharding(found) != launch_sharding(accelerator):
        fail(PROG, f"--resume_from_checkpoint {found} was saved by a {checkpoint_sharding(found)} run; this launch is "
                   f"{launch_sharding(accelerator)}: resume it with the accelerate config and process count it was saved with")
    return found


def launch_sharding(accelerator) -> str:
    """``"DeepSpeed ZeRO-1/2 x N process(es)"``, ``"DeepSpeed ZeRO-3 x N process(es)"``, ``"FSDP"`` or
    ``"DDP / one process"``: how this launch splits the trainable state (as ``checkpoint_sharding`` names it)."""
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        return f"DeepSpeed ZeRO-{'3' if ds.zero_stage == 3 else '1/2'} x {accelerator.num_processes} process(es)"
    return "FSDP" if accelerator.distributed_type.name == "FSDP" else "DDP / one process"


def checkpoint_sharding(folder: str) -> str:
    """``launch_sharding``'s name for the launch that saved ``folder``, read from accelerate's files: DeepSpeed writes
    one ``zero_pp_rank_*_optim_states.pt`` per process (+ per-process model states under ZeRO-3; ZeRO-1 and 2 write
    the same files), FSDP ``pytorch_model_fsdp*`` (torch distributed checkpoints: any process count)."""
    shards = len(list(Path(folder).glob("pytorch_model/zero_pp_rank_*_optim_states.pt")))
    if shards:
        stage = "3" if any(Path(folder).glob("pytorch_model/zero_pp_rank_*_model_states.pt")) else "1/2"
        return f"DeepSpeed ZeRO-{stage} x {shards} process(es)"
    return "FSDP" if any(Path(folder).glob("pytorch_model_fsdp*")) else "DDP / one process"
