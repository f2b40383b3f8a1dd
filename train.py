"""PW-OPSD / OPSD training: one visible loop of rollout -> teacher pass -> student pass -> clipped forward KL.

    python train.py --config configs/demo.yaml                        # CPU demo (SmolLM2-135M, offline)
    accelerate launch train.py --config configs/qwen3-4b-pwopsd.yaml  # the paper's setup

Each optimizer step (paper, Sec. 4 / Alg. 1) is numbered 1-7 in ``main``. The privileged teacher is the initial
policy (LoRA adapter off) with a reference solution in its prompt; it and the student read the student's own
tokens, and the per-token clipped forward KL is weighted and reduced with the step's global normaliser.
Setup (accelerator, models, engine, resume, output folder) is one call into pwopsd/run.py. Flags: ``--help``;
``--config FILE.yaml`` (flags win).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from transformers import SchedulerType

import evaluate as E
import loss as L
import pwopsd.engine as engines
import rollout as R
from data import DEFAULT_DATASET, load_problems
from pwopsd.cli import HINT_MODEL, arg, fail, load_tokenizer, parse_config
from pwopsd.console import budget_bar, interruptible, quiet_logs
from pwopsd.ema import update_ema_teacher
from pwopsd.folders import run_summary, save_checkpoint
from pwopsd.metrics import log_step, per_rollout, reduce_sums, step_metrics
from pwopsd.run import Run, check_args, interrupted_line, load_dataset, prompt_room, setup as build_run
from teacher import completion_hidden_states, render_problems, teacher_mode

PROG = "train.py"


@dataclass
class Args:
    # --- model ------------------------------------------------------------------------------------------------
    model: str = arg("Qwen/Qwen3-4B", "HF id, local folder, or smollm2-135m (offline demo)")
    trust_remote_code: bool = arg(False)
    allow_cpu: bool = arg(False, "run a GPU configuration (--dtype bfloat16) on the CPU when CUDA is missing, instead of stopping")
    dtype: str = arg("auto", "weights (+ autocast on GPU); auto = bfloat16 on GPU, float32 on CPU", choices=("auto", "float32", "bfloat16"))
    # --- data -------------------------------------------------------------------------------------------------
    dataset: str = arg(DEFAULT_DATASET, "Hub id, .jsonl/.json/.parquet, or demo-arithmetic[-flat][-test]")
    dataset_split: str = arg("train", "Hub split (ignored for local files)")
    problem_field: str | None = arg(None, "force the problem column")
    solution_field: str | None = arg(None, "force the reference-solution column")
    answer_field: str | None = arg(None, "force the answer column")
    max_prompt_length: int = arg(2048, "longer teacher/student prompts are skipped (counted)", check="> 0")
    student_template: str | None = arg(None, "the student's message, {problem} filled in verbatim (docs/fidelity.md)")
    teacher_template: str | None = arg(None, "the teacher's message, {problem} and {solution} filled in verbatim")
    # --- method (loss.py) -------------------------------------------------------------------------------------
    method: str = arg("pwopsd", "a row of the method table in loss.py", choices=L.METHODS)
    weighting: str | None = arg(None, "override the method's token weighting", choices=L.WEIGHTINGS)
    reduction: str | None = arg(None, "override the method's reduction", choices=L.REDUCTIONS)
    w_min: float = arg(0.25, "position weight floor w_min")
    w_tau: float = arg(0.30, "position weight midpoint tau")
    w_s: float = arg(0.10, "position weight slope s")
    temperature: float = arg(1.1, "loss temperature: divides student and teacher logits in the loss", check="> 0")
    clip: float = arg(0.05, "point-wise clip c of the forward KL; <= 0 disables")
    clip_mode: str = arg("pointwise", "pointwise (the paper) | total | scaled (loss.clip_kl_terms)", choices=L.CLIP_MODES)
    sft_prompts: str = arg("student", "sft: the reference solution under the student prompt, or both prompts", choices=("student", "both"))
    loss_impl: str = arg("chunked", "chunked (hidden states, O(chunk x V)) | reference", choices=L.LOSS_IMPLS)
    loss_chunk_size: int = arg(512, "tokens per chunk of the chunked loss (~4 x this x V floats)", check="> 0")
    beta: float = arg(0.0, "generalized JSD: 0 = forward KL (the paper), 1 = reverse KL, between = JSD", check="in [0, 1]")
    teacher_top_k: int = arg(0, "forward KL over the teacher's top-K tokens + a tail bucket (0 = all)", check=">= 0")
    # baselines (loss.py; all at --temperature): EOPD (arXiv:2603.07079), REOPOLD (arXiv:2603.11137), IWOPD (arXiv:2606.22600)
    eopd_clip_eps: float = arg(0.2, "eopd: PPO ratio clip epsilon", check=">= 0")
    eopd_entropy_threshold: float = arg(0.8, "eopd: top-k forward KL where teacher entropy (nats) exceeds this")
    eopd_top_k: int = arg(16, "eopd: teacher top-k tokens of the forward KL", check="> 0")
    reopold_lambda: float = arg(0.1, "reopold: reward floor log(lambda / (1 - lambda))", check="in (0, 1)")
    reopold_switch_step: int = arg(50, "reopold: from this step (0-based) mask by entropy")
    reopold_entropy_top: float = arg(0.2, "reopold: keep this top fraction of student-entropy tokens", check="in (0, 1]")
    iwopd_gamma: float = arg(0.5, "iwopd: w = 1 + gamma at the first token, falling towards 1", check=">= 0")
    # --- rollouts ---------------------------------------------------------------------------------------------
    rollout_backend: str = arg("auto", "auto = vllm when importable", choices=("auto", "vllm", "hf"))
    num_generations: int = arg(1, "student rollouts per prompt per step (1 = the paper)", check="> 0")
    max_new_tokens: int = arg(1024, "rollout length cap", check="> 0")
    rollout_temperature: float = arg(1.1, "sampling temperature of the rollouts (0 = greedy)", check=">= 0")
    top_p: float = arg(0.95, "sampling nucleus", check="in (0, 1]")
    top_k: int = arg(20, "sampling top-k (0 = off)")
    student_thinking: bool = arg(False, "chat-template thinking mode of the student prompt")
    teacher_thinking: bool = arg(True, "chat-template thinking mode of the teacher prompt")
    gpu_memory_utilization: float = arg(0.4, "vLLM on GPU: its share of GPU memory", check="in (0, 1]")
    kv_cache_gib: float = arg(1.0, "vLLM on CPU: KV cache size (GiB)", check="> 0")
    vllm_sleep: bool = arg(False, "vLLM on CUDA: sleep (weights to CPU, KV cache freed) during every train pass; off = the official runs")
    vllm_sync_every: int = arg(1, "push weights to vLLM every N optimizer steps (rollouts up to N-1 steps old)", check="> 0")
    vllm_sync: str = arg("auto", "LoRA -> vLLM: adapter | merged weights | auto (adapter for 16-bit weights)", choices=engines.SYNC_MODES)
    # --- teacher ----------------------------------------------------------------------------------------------
    teacher: str = arg("base", "base = the initial policy (the paper) | ema = an EMA of the student (LoRA)", choices=("base", "ema"))
    teacher_ema_decay: float = arg(0.999, "--teacher ema: teacher <- decay x teacher + (1 - decay) x student", check="in [0, 1]")
    # --- evaluation during training (evaluate.py's protocol and metrics, through the training engine) ---------
    eval_steps: int = arg(0, "Avg@n / Pass@k of the policy at step 0 and every N steps (0 = off)", check=">= 0")
    eval_benchmarks: list[str] = arg(["math500", "aime24", "aime25"], "evaluate.py benchmark names and/or local files")
    eval_n: int = arg(4, "samples per problem", check=">= 1")
    eval_limit: int | None = arg(None, "first N problems of each benchmark", check=">= 1")
    eval_temperature: float = arg(1.0, "sampling temperature of the evaluation (0 = greedy)", check=">= 0")
    eval_top_p: float = arg(0.95, "sampling nucleus of the evaluation (top-k off)", check="in (0, 1]")
    eval_max_new_tokens: int | None = arg(None, "evaluation response cap (default --max_new_tokens)", check=">= 1")
    eval_thinking: bool = arg(True, "chat-template thinking mode of the evaluation prompt")
    grading: str = arg("strict", "grading rule of the correct metric and evaluation (docs/grading_rules.md)", choices=("strict", "authors"))
    # --- LoRA / optimisation ----------------------------------------------------------------------------------
    use_lora: bool = arg(True, "false = full fine-tuning with a frozen teacher copy")
    lora_r: int = arg(64, "LoRA rank", check="> 0")
    lora_alpha: int = arg(128, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = arg(0.0, "LoRA dropout", check=">= 0")
    lora_target_modules: list[str] = arg(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    learning_rate: float = arg(5e-6, "AdamW learning rate (the paper: 5e-6)", check=">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    lr_scheduler_type: str = arg("constant", "learning-rate schedule (transformers.get_scheduler)", choices=[s.value for s in SchedulerType])
    warmup_steps: int = arg(0, "learning-rate warm-up steps", check=">= 0")
    max_grad_norm: float = arg(0.1, "gradient-norm clip (the paper: 0.1)", check="> 0")
    batch_size: int = arg(32, "prompts per optimizer step, all processes", check="> 0")
    per_device_train_batch_size: int = arg(4, "rollouts per micro-batch (the rest is accumulation)", check="> 0")
    max_steps: int = arg(150, "optimizer steps", check="> 0")
    gradient_checkpointing: bool = arg(True, "on GPU only")
    seed: int = arg(42, "seeds the LoRA init, the data order and every rollout (by seed, step, process)")
    # --- output -----------------------------------------------------------------------------------------------
    output_dir: str = arg("outputs/pwopsd", "checkpoints and metrics.jsonl")
    save_steps: int = arg(25, "checkpoint every N steps (and at the end)", check="> 0")
    resume_from_checkpoint: str | None = arg(None, "checkpoint folder, or 'latest' (none in --output_dir: start fresh)")
    overwrite_output_dir: bool = arg(False, "clear the run already in --output_dir instead of refusing")
    report_to: str = arg("none", "experiment tracker", choices=("none", "tensorboard", "wandb", "trackio"))
    verbose: bool = arg(False, "also show the libraries' logs and warnings (vLLM, transformers, ...)")
    config: str | None = arg(None, "YAML file of these flags (flags override it)")


def parse_args(argv=None) -> Args:
    """Flags over ``--config`` YAML over defaults, then every input check: one-line errors before anything loads."""
    args = parse_config(Args, argv, prog=PROG, description=__doc__)
    check_args(args, L.METHODS[args.method], L.REFERENCE_TARGETS)
    if args.eval_steps:
        E.check_eval_benchmarks(args.eval_benchmarks)
    return args


# ============== ALGORITHM: one optimizer step -- prompts, rollouts, teacher + student passes, loss, backward
def step_batch(run, step: int) -> tuple[list[dict], int]:
    """This process's prompts for ``step`` and the index of its first one in the step's batch: a seeded permutation
    per epoch cut into batches, process r takes slice r (disjoint; a function of seed and step only: resumable)."""
    args, per_rank = run.args, run.args.batch_size // run.accelerator.num_processes
    epoch, k = divmod(step, len(run.data) // args.batch_size)
    order = random.Random(args.seed + epoch).sample(range(len(run.data)), len(run.data))
    offset = k * args.batch_size + run.accelerator.process_index * per_rank
    return [run.data[i] for i in order[offset:offset + per_rank]], offset - k * args.batch_size


def sample_rollouts(run: Run, batch: list[dict], step: int) -> list[R.Rollout]:
    """G = ``--num_generations`` on-policy rollouts per prompt, seeded by (seed, step, process): ``[len(batch) * G]``,
    prompt-major. sft (``loss.REFERENCE_TARGETS``): each problem's reference solution + EOS instead."""
    args = run.args
    if run.loss_name in L.REFERENCE_TARGETS:  # sft: the reference solutions are the completions; nothing is sampled
        return [R.Rollout(b["student_ids"], b["reference_ids"], truncated=False) for b in batch]
    seed = args.seed * 1_000_003 + step * 1009 + run.accelerator.process_index
    with budget_bar(len(batch) * args.num_generations * args.max_new_tokens, "rollouts", leave=False,
                    disable=not run.accelerator.is_main_process) as bar:
        groups = R.generate(run.engine, [b["student_ids"] for b in batch], n=args.num_generations, seeds=seed,
                            max_new_tokens=args.max_new_tokens, temperature=args.rollout_temperature, top_p=args.top_p,
                            top_k=args.top_k, progress=bar)
    engines.sleep(run.engine)  # GPU: free the engine's KV cache and weights for the train pass (no-op on CPU)
    return [r for g in groups for r in g]


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
    """Teacher and student passes, loss and backward over the step's micro-batches (paper Alg. 1, lines 4-7): leaves
    the gradient of the *global* step loss in ``.grad``; returns ``{"loss" (all processes), "total_tokens",
    "total_sequences", "weights" [N_local], "stats"}``."""
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
    """Per-token statistics of the whole step, all processes, for losses that select tokens by them
    (``loss.TOKEN_STATS``: REOPOLD's entropy top-20 %), from one extra no-grad pass before the first backward.
    Returns ``(per micro-batch [N_m, k] list, whole step [N_step, k])``, or ``([], None)``."""
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
    """Clip, step, zero, schedule; returns the gradient norm (under DeepSpeed these calls only report)."""
    grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad()
    run.scheduler.step()
    return grad_norm


# ============== The loop
def main(argv=None, on_step=None):
    """Train; returns the output folder. ``on_step(run, step)`` (optional) runs before the first step and after every
    optimizer step (step = steps done, after the engine sync and the checkpoint)."""
    from tqdm.auto import tqdm

    args = parse_args(argv)
    quiet_logs(args.verbose)
    t0 = time.time()
    run = setup(args)
    if args.eval_steps and run.start_step == 0:  # the step-0 value: the initial policy
        E.log_eval(run, E.evaluate_policy(run, 0), tqdm)  # (tqdm.write: no bar yet)
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
        times["sync"] = engines.sync_weights(run.engine, run.model, run.accelerator) if (step + 1) % args.vllm_sync_every == 0 else 0.0
        # 6. Metrics (reduced over processes), log, checkpoint.
        log_step(run, step_metrics(run, batch, rollouts, out, grad_norm, times, step), bar)
        if args.eval_steps and (step + 1) % args.eval_steps == 0:  # 7. evaluation of the policy after this step
            if (step + 1) % args.vllm_sync_every:  # the engine must sample the current weights
                engines.sync_weights(run.engine, run.model, run.accelerator)
            E.log_eval(run, E.evaluate_policy(run, step + 1), bar)
        if (step + 1) % args.save_steps == 0 or step + 1 == args.max_steps:
            save_checkpoint(run.accelerator, run.model, args, step + 1, run.ema)
        if on_step is not None:
            on_step(run, step + 1)
    engines.close(run.engine)  # before end_training() destroys the process group vLLM also uses
    run.accelerator.end_training()
    if run.accelerator.is_main_process:
        for line in E.heldout_summary(args):  # what training did to held-out accuracy (--eval_steps)
            print(line)
        print(run_summary(args, run.start_step, time.time() - t0 - run.build_seconds, run.build_seconds))
    return args.output_dir


# ============== Setup: one call (pwopsd/run.py); the parts that read stage files are handed in from here
def setup(args: Args) -> Run:
    """Everything before the loop: accelerator, prompts, student + teacher, optimizer, engine, resume."""
    return build_run(args, L.METHODS[args.method], build_prompts, E.load_eval_benchmarks)


def build_prompts(args: Args, accelerator):
    """``(tokenizer, problems with rendered prompts, model folder)``; prompts too long are skipped, never truncated."""
    problems = load_dataset(args, load_problems)
    tok, model_path = load_tokenizer(args.model, what=f"{PROG}: --model {args.model}", hint=HINT_MODEL,
                                     trust_remote_code=args.trust_remote_code)
    limit, room = prompt_room(args, model_path, tok)  # a prompt and a full response fit the model's context
    data, skipped = render_problems(tok, problems, limit, student_thinking=args.student_thinking,
                                    teacher_thinking=args.teacher_thinking, student_template=args.student_template,
                                    teacher_template=args.teacher_template)
    if L.METHODS[args.method].loss in L.REFERENCE_TARGETS:  # sft trains on the reference solution + EOS as its "rollout"
        data = [{**d, "reference_ids": R.encode(tok, d["solution"]) + [tok.eos_token_id]} for d in data]
        if args.sft_prompts == "both":  # each solution also under the teacher prompt (a batch mixes the two)
            data += [{**d, "student_ids": d["teacher_ids"]} for d in data]
    if skipped:  # loud: the training set is not the whole dataset (the official runs skip nothing)
        accelerator.print(f"[train] WARNING: skipped {skipped} of {len(problems)} problems whose prompt "
                          f"exceeds --max_prompt_length {args.max_prompt_length}{room}")
    if len(data) < args.batch_size:
        fail(PROG, f"--dataset {args.dataset}: {len(data)} usable problems < --batch_size {args.batch_size}")
    return tok, data, model_path


cli = interruptible(main, PROG, interrupted_line)  # Ctrl-C: one line naming the last checkpoint and how to continue
if __name__ == "__main__":
    cli()
