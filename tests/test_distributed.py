"""Data parallelism and sharding are the same math: 2 processes x 2 sequences == 1 x 4 == 1 x 2 micro-batches of 2.

Real 2-process runs on CPU (gloo), one launch per accelerate config, against 1-process runs made in this process,
all on fixed completions of uneven lengths (tests/dist_grad_worker.py):
- DDP (`--multi_gpu`): the loss and every LoRA gradient, both reductions.
- DeepSpeed ZeRO-2 and ZeRO-3 (configs/accelerate/zero*.yaml) -- and, with PWOPSD_TEST_FORCED_FSDP=1, FSDP2
  (configs/accelerate/fsdp2.yaml with accelerate's FSDP switch forced; FSDP2_NOT_LAUNCHABLE says why): the step-1
  loss, gradients and gradient norm; both optimizer steps are torch's clip + AdamW of the run's own gradients;
  checkpoint-1 holds the step-1 adapter, resuming it restores the state and replays step 2; the vLLM weight-sync
  tensors (merged and adapter) equal those of the unsharded model with that adapter, on every rank; a checkpoint
  of another sharding is refused in one line, both ways.
Tolerance TOL = 1e-5, relative plus TOL x each tensor's largest entry: the other summation order's float32 rounding
reaches 1.5e-6 on the gradients here (ZeRO-2; 1e-6 would fail), a wrong normalisation of the split is >= 1e-2.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

import dist_grad_worker as W
import pwopsd.distributed
import pwopsd.engine as engines

TOL = 1e-5
LR, MAX_NORM = 1e-3, 0.1  # a visible update; the clip is active (step-1 gradient norm ~1.5)
# Sharded configs: the accelerate config file and the worker's case.
SHARDED = {"zero2": ("zero2.yaml", "steps"), "zero3": ("zero3.yaml", "steps"), "fsdp2": ("fsdp2.yaml", "steps-forced-fsdp")}
FORCED_FSDP = os.environ.get("PWOPSD_TEST_FORCED_FSDP") == "1"
FSDP2_NOT_LAUNCHABLE = pytest.mark.skipif(not FORCED_FSDP, reason=(
    "FSDP2 cannot be launched on CPU: accelerate 1.15 enables FSDP only on GPU-type backends, so `accelerate launch "
    "--config_file configs/accelerate/fsdp2.yaml` runs plain DDP (MULTI_CPU) and train.py refuses it. "
    "PWOPSD_TEST_FORCED_FSDP=1 runs these checks with accelerate's FSDP switch forced (one more launch, ~25 s of CPU)"))


def flags(model, out, micro, data):
    return ["--model", model, "--dataset", str(data), "--batch_size", "4", "--per_device_train_batch_size",
            str(micro), "--rollout_backend", "hf", "--lora_r", "4", "--lora_alpha", "8", "--method", "pwopsd",
            "--learning_rate", str(LR), "--max_grad_norm", str(MAX_NORM), "--output_dir", str(out), "--seed", "3"]


def launch(tmp_path, name, case, model, data, config=None, foreign=None):
    """2 processes of tests/dist_grad_worker.py under `accelerate launch`: `--multi_gpu` (torchrun; gloo on a machine
    without CUDA -- `--cpu --num_processes 2` would start one process) or `--config_file configs/accelerate/<config>`."""
    out = tmp_path / f"{name}.pt"
    how = ["--config_file", str(ROOT / "configs" / "accelerate" / config)] if config else ["--multi_gpu", "--num_machines", "1"]
    head = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "29517"]
    extra = ["--foreign", str(foreign)] if foreign else []
    cmd = head + [str(ROOT / "tests" / "dist_grad_worker.py"), str(out), case, *extra, "--", *flags(model, tmp_path / name, 2, data)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    assert result["processes"] == 2
    return result


def assert_tensors_close(got: dict, ref: dict, scale: float | None = None):
    """Every tensor of ``ref`` within TOL of ``got``: relative, plus TOL x the tensor's largest entry (or ``scale``)."""
    assert got.keys() == ref.keys() and len(ref) > 0
    for name, r in ref.items():
        atol = TOL * (scale if scale is not None else r.abs().max().item())
        torch.testing.assert_close(got[name], r, rtol=TOL, atol=atol, msg=name)


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    """8 problems: steps 0 and 1 of --batch_size 4 (a small file: rendering demo-arithmetic's 2,000 takes seconds)."""
    import json

    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {i} + {3 * i}?", "solution": f"{i} + {3 * i} = {4 * i}",
                                        "answer": str(4 * i)}) + "\n" for i in range(1, 9)))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, peaked_model_dir, problems):
    """The 1-process references, in this process: 1 x 4 and 1 x 2 x 2 gradients, and the steps case 1 x 4."""
    tmp = tmp_path_factory.mktemp("one")
    return {"1x4": W.run_case("grads", flags(peaked_model_dir, tmp / "1x4", 4, problems)),
            "1x2x2": W.run_case("grads", flags(peaked_model_dir, tmp / "1x2x2", 2, problems)),
            "steps": W.run_case("steps", flags(peaked_model_dir, tmp / "steps", 4, problems))}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, peaked_model_dir, problems):
    return launch(tmp_path_factory.mktemp("ddp"), "2x2", "grads", peaked_model_dir, problems)


@pytest.fixture(scope="module", params=["zero2", "zero3", pytest.param("fsdp2", marks=FSDP2_NOT_LAUNCHABLE)])
def sharded(request, tmp_path_factory, peaked_model_dir, problems, one_process):
    config, case = SHARDED[request.param]
    foreign = one_process["steps"]["checkpoint"]  # a DDP / one-process checkpoint: must be refused
    return request.param, launch(tmp_path_factory.mktemp(request.param), request.param, case, peaked_model_dir,
                                 problems, config, foreign)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("other", ["1x2x2", "2x2"])
def test_same_loss_and_gradients(one_process, ddp, reduction, other):
    ref = one_process["1x4"][reduction]
    got = (ddp if other == "2x2" else one_process[other])[reduction]
    assert ref["loss"] > 0.05  # a real signal, not rounding noise
    assert got["loss"] == pytest.approx(ref["loss"], rel=TOL)
    assert_tensors_close(got["grads"], ref["grads"], scale=max(g.abs().max().item() for g in ref["grads"].values()))
    assert sum(int(g.abs().max() > 0) for g in ref["grads"].values()) > 0  # LoRA B starts at zero, A's gradient not


def test_reductions_differ(one_process):
    """Uneven lengths: the token and sequence reductions must give different losses (the test can fail)."""
    assert one_process["1x4"]["token"]["loss"] != pytest.approx(one_process["1x4"]["sequence"]["loss"], rel=1e-3)


def test_sharded_step_equals_one_process(one_process, sharded):
    name, got = sharded
    ref = one_process["steps"]["step1"]
    assert got["sharding"] == {"zero2": "DeepSpeed ZeRO-1/2 x 2 process(es)", "zero3": "DeepSpeed ZeRO-3 x 2 process(es)",
                               "fsdp2": "FSDP"}[name]  # the config really ran (accelerate falls back silently)
    assert got["step1"]["loss"] == pytest.approx(ref["loss"], rel=TOL) and ref["loss"] > 0.05
    assert got["step1"]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=TOL) and ref["grad_norm"] > MAX_NORM
    assert_tensors_close(got["step1"]["grads"], ref["grads"])


def adamw_updates(steps: list[dict]) -> list[dict]:
    """torch's clip_grad_norm_ + AdamW (train.optimizer_step without sharding) applied to each step's gradients."""
    names = list(steps[0]["grads"])
    params = [torch.zeros_like(steps[0]["grads"][n], requires_grad=True) for n in names]  # no weight decay: offset-free
    opt, updates = torch.optim.AdamW(params, lr=LR, weight_decay=0.0), []
    for s in steps:
        before = [p.detach().clone() for p in params]
        for p, n in zip(params, names):
            p.grad = s["grads"][n].clone()
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        updates.append({n: p.detach() - b for n, p, b in zip(names, params, before)})
    return updates


def steps_runs(one_process, sharded):
    return {"1 process": one_process["steps"], sharded[0]: sharded[1]}


def test_optimizer_steps_are_clip_and_adamw_of_the_gradients(one_process, sharded):
    """Adam's first step is ~lr x sign(g): it magnifies rounding where g ~ eps, so each run's updates are compared
    with AdamW applied to its *own* gradients (equal to the 1-process ones: test above), over both steps."""
    for name, run in steps_runs(one_process, sharded).items():
        for s, expected in zip(("step1", "step2"), adamw_updates([run["step1"], run["step2"]])):
            assert_tensors_close(run[s]["update"], expected, scale=LR)
        assert max(u.abs().max().item() for u in run["step1"]["update"].values()) > 0.5 * LR, name


def test_checkpoint_holds_the_adapter_and_resume_replays_step_2(one_process, sharded):
    from safetensors.torch import load_file

    for name, run in steps_runs(one_process, sharded).items():
        after1 = run["step1"]["after"]
        saved = load_file(os.path.join(run["checkpoint"], "adapter", "adapter_model.safetensors"))
        assert {k: saved[k.replace(".default.", ".")] for k in after1}.keys() == after1.keys()
        assert_tensors_close({k: saved[k.replace(".default.", ".")] for k in after1}, after1)
        assert run["checkpoint_sharding"] == run["sharding"], name
        assert_tensors_close(run["resumed"], after1)  # weights back at step 1 ...
        assert run["replay2"]["loss"] == pytest.approx(run["step2"]["loss"], rel=TOL)
        assert_tensors_close(run["replay2"]["after"], run["step2"]["after"])  # ... and Adam's moments too


def test_fsdp_checkpoint_holds_trainable_tensors_only(sharded):
    """accelerate writes an FSDP model before the save hooks run; pwopsd.folders.fsdp_trainable_only keeps the frozen base
    out of it (issue 23 e): the checkpoint's model tensors are exactly the LoRA tensors."""
    name, got = sharded
    if name != "fsdp2":
        pytest.skip("DeepSpeed checkpoints: exclude_frozen_parameters (checked by the resume test)")
    assert got["fsdp_checkpoint_keys"] == got["trainable_names"] and got["trainable_names"]
    assert all("lora_" in k for k in got["fsdp_checkpoint_keys"])


def test_weight_sync_tensors_equal_the_unsharded_model(one_process, sharded, peaked_model_dir):
    """The vLLM sync's tensors -- pwopsd.engine.policy_weights (--vllm_sync merged: ZeRO-3 gathered / FSDP2 DTensors made
    whole, LoRA merged) and pwopsd.engine.adapter_tensors (--vllm_sync adapter) -- against the plain model + checkpoint-1's
    adapter; every rank yields the same tensors."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for name, run in steps_runs(one_process, sharded).items():
        adapter = os.path.join(run["checkpoint"], "adapter")
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(peaked_model_dir), adapter)
        with torch.no_grad():
            expected = {n: t.clone() for n, t in engines.policy_weights(plain)}
        assert_tensors_close(run["policy"], expected)
        assert_tensors_close(run["adapter_tensors"], load_file(os.path.join(adapter, "adapter_model.safetensors")))
        for rank_sums in run["sync_sums"][1:]:
            assert rank_sums == pytest.approx(run["sync_sums"][0], rel=1e-12), name


def test_checkpoint_of_another_sharding_is_refused_both_ways(one_process, sharded, problems):
    import train

    name, got = sharded
    assert got["refusal"].startswith(f"train.py: --resume_from_checkpoint {one_process['steps']['checkpoint']} was saved "
                                     f"by a DDP / one process run; this launch is {got['sharding']}:")
    ref_args = train.parse_args(flags("unused", got["checkpoint"] + "-resumed", 4, problems))
    accelerator, _ = pwopsd.distributed.build_accelerator(ref_args)
    ref_args.resume_from_checkpoint = got["checkpoint"]
    expected = f"was saved by a {got['checkpoint_sharding']} run; this launch is DDP / one process:"
    with pytest.raises(SystemExit, match=re.escape(expected)):
        pwopsd.distributed.find_checkpoint(ref_args, accelerator)
