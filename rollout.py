"""Student rollouts: the student prompt, and sampling it with the current policy.

The student sees only the problem (paper, Sec. 3 / OPSD), as a user message rendered with the tokenizer's chat
template (``add_generation_prompt=True``, ``enable_thinking=student_thinking``):

    Problem: {problem}

    Please reason step by step, and put your final answer within \\boxed{}.

``problem_message`` builds this message for every stage -- student, privileged teacher (which adds its reference
solution between the two parts) and evaluation -- so the instruction appears exactly once. Generation is token
ids in, token ids out: the completion the teacher scores and the loss trains on is exactly what was sampled.
The engine behind ``generate`` (vLLM or HF ``generate``, weight sync) is pwopsd/engine.py.

    python rollout.py --model smollm2-135m --dataset demo-arithmetic --num_prompts 4 [--rollout_backend vllm]
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pwopsd.engine as engines
from pwopsd.cli import arg, load_or_exit, load_tokenizer, parse_config
from pwopsd.engine import Engine, Rollout  # noqa: F401  (Rollout: the record every stage passes around)

# The boxed-answer instruction, shared by the student, teacher and evaluation prompts.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# A boxed-answer instruction already at the end of a problem (many public math sets carry one): ours in any
# case, spacing or final punctuation, and the common variants ("Let's think step by step and output the
# final answer within \boxed{}.", "... put the final answer in $\boxed{}$").
_TRAILING_INSTRUCTION = re.compile(
    r"\s*(?:(?:please|let'?s|let us)\s+)?(?:reason|think)\s+step[\s-]+by[\s-]+step\s*[,;.]?\s*(?:and\s+)?(?:then\s+)?"
    r"(?:put|output|write|give|place|present)\s+(?:your|the)\s+final\s+answer\s+(?:within|in|inside)\s+"
    r"\$?\s*\\boxed\s*\{\s*\}\s*\$?\s*[.!]*\s*$", re.IGNORECASE)
# ... or at its *start* (OpenThoughts-derived sets such as the default one: "Return your final response within \boxed{}.").
_LEADING_INSTRUCTION = re.compile(
    r"^\s*(?:return\s+your\s+final\s+(?:response|answer)\s+(?:within|in|inside)\s+\$?\s*\\boxed\s*\{\s*\}\s*\$?|"
    + _TRAILING_INSTRUCTION.pattern.removeprefix(r"\s*").removesuffix(r"\s*[.!]*\s*$") + r")\s*[.!]*\s*", re.IGNORECASE)


def render_chat(tokenizer, user_message: str, enable_thinking: bool) -> str:
    """Chat-template a single user turn with the generation prompt.

    ``enable_thinking`` reaches templates that read it (Qwen3); others ignore it. If thinking is off
    and the rendered prompt still ends inside an open ``<think>`` (DSR1-Distill, Olmo-3-Think), the
    block is closed so the model answers directly.
    """
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)
    if not enable_thinking and text.rstrip().endswith("<think>"):
        text += "</think>\n\n"
    return text


def problem_message(problem: str, context: str = "") -> str:
    """The user message of every stage: ``Problem: {problem}\\n\\n{context}{INSTRUCTION}``.

    ``context`` is empty for the student and evaluation, the reference-solution block for the teacher
    (teacher.py). A boxed-answer instruction the problem already ends or begins with (``_TRAILING_INSTRUCTION`` /
    ``_LEADING_INSTRUCTION``: ours or a common variant, repeated or not) is removed first: ``INSTRUCTION`` appears once.
    """
    core = problem.strip()
    while (m := _TRAILING_INSTRUCTION.search(core)) and m.start() > 0:
        core = core[: m.start()].rstrip()
    while (m := _LEADING_INSTRUCTION.match(core)) and m.end() < len(core):
        core = core[m.end():]
    return f"Problem: {core}\n\n{context}{INSTRUCTION}"


def fill_template(template: str, problem: str, solution: str = "") -> str:
    """A ``--student_template`` / ``--teacher_template`` message: ``{problem}`` / ``{solution}`` filled in verbatim, in one
    pass (nothing stripped or removed; other braces, e.g. ``\\boxed{}``, stay). The authors' wording: docs/fidelity.md."""
    return re.sub(r"\{(problem|solution)\}", lambda m: {"problem": problem, "solution": solution}[m[1]], template)


def student_prompt(tokenizer, problem: str, enable_thinking: bool = False, template: str | None = None) -> str:
    """The student's rendered prompt for ``problem`` (string; encode with ``add_special_tokens=False``; ``template``: see
    ``fill_template``). Evaluation uses the same prompt: the model is tested on the message it was trained on."""
    return render_chat(tokenizer, problem_message(problem) if template is None else fill_template(template, problem), enable_thinking)


def encode(tokenizer, text: str) -> list[int]:
    # The chat template already contains BOS/special tokens: never add them twice.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate(engine: Engine, prompts: list[list[int]], *, n: int = 1, seeds: int | list[int] = 0,
             budgets: list[int] | None = None, max_new_tokens: int = 1024, temperature: float = 1.1,
             top_p: float = 0.95, top_k: int = 20, logprobs: bool = False, progress=None) -> list[list[Rollout]]:
    """``n`` samples of every prompt -> ``[len(prompts)][n]`` ``Rollout``s (``temperature`` 0 = greedy, ``top_k`` <= 0 off).

    ``prompts``: rendered prompt token ids (``encode``). ``seeds``: one per prompt, or one int for the call; on vLLM a
    prompt's samples depend only on (its seed, the weights), so a resumed run samples the same (HF seeds once per
    call). ``budgets``: new tokens per prompt (default ``max_new_tokens``), capped by the context. ``logprobs``: each
    sampled token's log-prob (vLLM). ``progress``: a bar counted in tokens of budget (``console.budget_bar``).
    Completions end at and include the first stop token; ``truncated`` = the budget ran out first. Raises
    ValueError when a prompt leaves no room in the context. Seeding and progress in detail: docs/notes.md.
    """
    if not prompts:
        return []
    room = [engine.max_model_len - len(p) for p in prompts]
    if min(room) < 1:
        longest = max(map(len, prompts))
        raise ValueError(f"a prompt of {longest} tokens fills the model's context ({engine.max_model_len} tokens)")
    asked = budgets or [max_new_tokens] * len(prompts)
    budgets = [min(b, r) for b, r in zip(asked, room)]
    sample = engines.SAMPLERS[engine.backend]
    groups = sample(engine, prompts, n, seeds, budgets, temperature, top_p, top_k, logprobs, progress)
    if progress is not None and sum(asked) > sum(budgets):  # the samplers counted the capped budgets; the rest is
        progress.update(n * (sum(asked) - sum(budgets)))       # cut off by the context: spent too
    return groups


@dataclass
class RolloutArgs:
    model: str = arg("smollm2-135m", "HF id, local folder, or smollm2-135m")
    dataset: str = arg("demo-arithmetic", "anything data.load_problems reads")
    num_prompts: int = arg(4, "the first N problems of --dataset", check=">= 1")
    max_new_tokens: int = arg(128, "response length cap", check="> 0")
    rollout_temperature: float = arg(1.1, "sampling temperature (0 = greedy)", check=">= 0")
    top_p: float = arg(0.95, "sampling nucleus", check="in (0, 1]")
    top_k: int = arg(20, "0 = off")
    student_thinking: bool = arg(False, "chat-template thinking mode of the student prompt")
    seed: int = arg(0, "sampling seed")
    rollout_backend: str = arg("hf", choices=("auto", "vllm", "hf"))
    config: str | None = arg(None, "YAML file of these flags")


def main(argv=None):
    from data import load_problems

    a = parse_config(RolloutArgs, argv, prog="rollout.py", description="Sample student rollouts and print them.")
    problems = load_or_exit("rollout.py", load_problems, a.dataset, limit=a.num_prompts, require_solution=False)
    tok, path = load_tokenizer(a.model)
    prompts = [encode(tok, student_prompt(tok, r["problem"], a.student_thinking)) for r in problems]
    engine = engines.make_engine(a.rollout_backend, path, tokenizer=tok, dtype="float32", seed=a.seed,
                         max_model_len=max(map(len, prompts)) + a.max_new_tokens, gpu_memory_utilization=0.4)
    t0 = time.time()
    rollouts = [g[0] for g in generate(engine, prompts, seeds=a.seed, max_new_tokens=a.max_new_tokens,
                                       temperature=a.rollout_temperature, top_p=a.top_p, top_k=a.top_k)]
    for r, ro in zip(problems, rollouts):
        print(f"--- {r['id']} (answer {r['answer']}, {len(ro.completion_ids)} tokens, truncated={ro.truncated})")
        print(tok.decode(ro.completion_ids))
    print(f"{sum(len(r.completion_ids) for r in rollouts) / (time.time() - t0):.1f} tokens/s")
    engines.close(engine)


if __name__ == "__main__":
    main()
