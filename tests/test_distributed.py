"""Data parallelism is the same math: 2 processes x 2 sequences == 1 x 4 == 1 x 2 micro-batches of 2.

Real 2-process runs (`accelerate launch --multi_gpu` = torchrun; gloo on CPU), fixed completions of uneven lengths, both reductions, LoRA
gradients compared at 1e-6.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def launch(tmp_path, name, processes, micro, model):
    out = tmp_path / f"{name}.pt"
    flags = ["--model", model, "--dataset", "demo-arithmetic", "--batch_size", "4", "--per_device_train_batch_size",
             str(micro), "--rollout_backend", "hf", "--lora_r", "4", "--lora_alpha", "8", "--method", "pwopsd",
             "--output_dir", str(tmp_path / name), "--seed", "3"]
    worker = str(ROOT / "tests" / "dist_grad_worker.py")
    # `--multi_gpu` is accelerate's torchrun launcher; on a machine without CUDA train.py joins a gloo group.
    # (`accelerate launch --cpu --num_processes 2` would start a single process.)
    head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"] \
        if processes > 1 else [sys.executable]
    p = subprocess.run(head + [worker, str(out), "--", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    result = torch.load(out)
    assert result["processes"] == processes
    return result


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with larger random weights: peaked next-token distributions, so the teacher/student
    KL is O(1) and float32 rounding (~1e-7 relative) cannot hide a normalisation error of the split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, peaked_model_dir):
    tmp = tmp_path_factory.mktemp("dist")
    return {"1x4": launch(tmp, "1x4", 1, 4, peaked_model_dir),
            "1x2x2": launch(tmp, "1x2x2", 1, 2, peaked_model_dir),
            "2x2": launch(tmp, "2x2", 2, 2, peaked_model_dir)}


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("other", ["1x2x2", "2x2"])
def test_same_loss_and_gradients(runs, reduction, other):
    ref, got = runs["1x4"][reduction], runs[other][reduction]
    assert ref["loss"] > 0.05  # a real signal, not rounding noise
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert ref["grads"].keys() == got["grads"].keys() and len(ref["grads"]) > 0
    nonzero, ref_scale = 0, max(g.abs().max().item() for g in ref["grads"].values())
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-6, atol=1e-6 * ref_scale, msg=name)
        nonzero += int(g.abs().max() > 0)
    assert nonzero > 0  # LoRA B starts at zero, but A's gradient does not... at least some must be non-zero


def test_reductions_differ(runs):
    """Uneven lengths: the token and sequence reductions must give different losses (the test can fail)."""
    assert runs["1x4"]["token"]["loss"] != pytest.approx(runs["1x4"]["sequence"]["loss"], rel=1e-3)
