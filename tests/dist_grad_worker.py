"""Train steps on *fixed* completions, under `accelerate launch` or in-process; rank 0 saves what they gave.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_grad_worker.py OUT.pt CASE -- <train.py flags>
    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 2 tests/dist_grad_worker.py ...

CASE ``grads``: the step-0 loss and LoRA gradients under both reductions (no optimizer step).
CASE ``steps``: ``steps_case`` -- two optimizer steps with a checkpoint between them, the checkpoint resumed and
the second step replayed, the vLLM weight-sync tensors, and the refusal of a checkpoint of another sharding.
CASE ``steps-forced-fsdp``: ``steps`` under configs/accelerate/fsdp2.yaml on CPU, where accelerate would not enable
FSDP (it does only with GPUs): its switch is forced here, so train.py's and rollout.py's FSDP2 code paths run.
Used by tests/test_distributed.py: none of this may depend on how the step is split over processes.
"""
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rollout as R  # noqa: E402
import train  # noqa: E402
import pwopsd.distributed
import pwopsd.engine as engines
import pwopsd.folders
import pwopsd.run

# Uneven completion lengths (token ids well inside the vocabulary); sequence i belongs to prompt i of its step.
COMPLETIONS = [[101, 102, 103, 104, 105, 2], [201, 202], [301, 302, 303, 304, 305, 306, 307, 308, 2], [401, 402, 403, 2]]


def fixed_rollouts(run, step: int):
    batch, offset = train.step_batch(run, step)  # this process's prompts and their index in the step
    return batch, [R.Rollout(b["student_ids"], COMPLETIONS[offset + i], truncated=False) for i, b in enumerate(batch)]


def trainable(run) -> dict:
    """``{name: whole tensor (a copy)}`` of the trainable (LoRA) tensors."""
    params = [(n, p) for n, p in run.accelerator.unwrap_model(run.model).named_parameters() if p.requires_grad]
    with engines.full_tensors([p for _, p in params]) as full:
        return {n: full(p).detach().clone() for n, p in params}


def full_grads(run) -> dict:
    """``{name: whole gradient}`` of the trainable tensors, after the last backward and before the optimizer step."""
    named = [(n, p) for n, p in run.accelerator.unwrap_model(run.model).named_parameters() if p.requires_grad]
    if run.accelerator.state.deepspeed_plugin is not None:  # ZeRO keeps (partitioned) gradients in its own buffers
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p).detach().clone() for n, p in named}
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone() for n, p in named}


def one_step(run, step: int) -> dict:
    """One optimizer step of the train loop on fixed rollouts: ``{"loss", "grads" (before clipping), "update"}``."""
    batch, rollouts = fixed_rollouts(run, step)
    before, grads = trainable(run), {}
    engine = run.model if run.accelerator.state.deepspeed_plugin is not None else None
    if engine is not None:  # accelerate lets DeepSpeed step inside the last backward: read the gradients just before
        engine_step = engine.step
        engine.step = lambda *a, **k: (grads.update(full_grads(run)), engine_step(*a, **k))[1]
    out = train.accumulate_gradients(run, batch, rollouts, step)
    if engine is not None:
        del engine.step  # the instance attribute set above; DeepSpeedEngine.step again
    else:
        grads = full_grads(run)
    grad_norm = float(train.optimizer_step(run))
    after = trainable(run)
    return {"loss": out["loss"], "grads": grads, "grad_norm": grad_norm, "after": after,
            "update": {n: after[n] - before[n] for n in after}}


def grads_case(run) -> dict:
    result = {}
    batch, rollouts = fixed_rollouts(run, 0)
    for reduction in ("token", "sequence"):
        run.reduction = reduction
        run.optimizer.zero_grad()
        stats = train.accumulate_gradients(run, batch, rollouts, step=0)
        result[reduction] = {"loss": stats["loss"], "grads": full_grads(run)}
    return result


def steps_case(run, foreign_checkpoint: str | None) -> dict:
    """Step 1, checkpoint-1, the vLLM sync tensors (merged and adapter), step 2; then resume checkpoint-1 (pwopsd.run.resume_from, as a new
    launch does) and replay step 2. With ``foreign_checkpoint``: pwopsd.distributed.find_checkpoint's refusal message for it."""
    from accelerate.utils import gather_object

    acc, result = run.accelerator, {"sharding": pwopsd.distributed.launch_sharding(run.accelerator)}
    result["step1"] = one_step(run, 0)
    pwopsd.folders.save_checkpoint(acc, run.model, run.args, 1)
    fsdp_dir = Path(run.args.output_dir) / "checkpoint-1" / "pytorch_model_fsdp_0"
    if fsdp_dir.is_dir():  # the model tensors of accelerate's FSDP checkpoint (pwopsd.folders.fsdp_trainable_only)
        import torch.distributed.checkpoint as dcp

        result["fsdp_checkpoint_keys"] = sorted(dcp.FileSystemReader(str(fsdp_dir)).read_metadata().state_dict_metadata)
    result["trainable_names"] = sorted(n for n, p in acc.unwrap_model(run.model).named_parameters() if p.requires_grad)
    # The vLLM sync's tensors, both modes (collective: every rank syncs its own engine): merged weights, LoRA adapter.
    result["policy"] = {n: t.clone() for n, t in engines.policy_weights(run.model, acc)}
    result["adapter_tensors"] = {n: t.clone() for n, t in engines.adapter_tensors(run.model, acc)}
    synced = {**result["policy"], **result["adapter_tensors"]}
    result["sync_sums"] = gather_object([{n: t.double().sum().item() for n, t in synced.items()}])  # per rank
    result["step2"] = one_step(run, 1)
    checkpoint = str(Path(run.args.output_dir) / "checkpoint-1")
    result["checkpoint"], result["checkpoint_sharding"] = checkpoint, pwopsd.distributed.checkpoint_sharding(checkpoint)
    pwopsd.run.resume_from(run, checkpoint)
    result["resumed"] = trainable(run)
    result["replay2"] = one_step(run, 1)
    if foreign_checkpoint is not None:
        try:
            pwopsd.distributed.find_checkpoint(dataclasses.replace(run.args, resume_from_checkpoint=foreign_checkpoint), acc)
        except SystemExit as e:
            result["refusal"] = str(e)
    return result


def run_case(case: str, flags: list[str], foreign_checkpoint: str | None = None) -> dict:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        import deepspeed.ops

        # DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce at start-up (~70 s of CPU, once per
        # machine, needs a C++ compiler). Only DeepSpeed *inference* uses it; training's collectives go through
        # torch.distributed (gloo) either way. Marked unbuildable here, so a fresh machine does not compile it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if case == "steps-forced-fsdp":
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        # Test-only: claim a GPU-type group, so that accelerate's FSDP2 plugin is used on the gloo processes.
        PartialState(cpu=False, backend="gloo")
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    run = train.setup(train.parse_args(flags))
    result = grads_case(run) if case == "grads" else steps_case(run, foreign_checkpoint)
    return {**result, "processes": run.accelerator.num_processes}


def main():
    out, case, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    foreign = rest[rest.index("--foreign") + 1] if "--foreign" in rest else None
    result = run_case(case, rest[rest.index("--") + 1:], foreign)
    import accelerate

    if accelerate.PartialState().is_main_process:
        torch.save(result, out)
    accelerate.PartialState().wait_for_everyone()


if __name__ == "__main__":
    main()
