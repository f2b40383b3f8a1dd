"""The privileged teacher: its prompt, and the forward pass that scores the student's own tokens.

Teacher = the frozen initial policy (under LoRA: the same network with the adapter disabled) shown the
problem *and a reference solution* (OPSD, arXiv:2601.18734, Sec. 3). It reads the student's completion
token ids unchanged after its own prompt, so position k of the completion is scored by

    teacher:  p_T(. | teacher_prompt, y_<k)        student:  p_S(. | student_prompt, y_<k)

Both passes return the *final hidden states* at the completion positions ([N, H], N = total completion
tokens of the batch, sequences concatenated in order): the lm_head is applied later, by the loss, chunk
by chunk (loss.py), so a [B, T, V] logits tensor never exists.

    python teacher.py --model smollm2-135m --dataset demo-arithmetic   # show prompts + per-token KL
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

from data import arg, parse_config
from rollout import encode, problem_message, render_chat, student_prompt

# Between the problem and rollout.INSTRUCTION (the same boxed-answer sentence the student sees), see
# rollout.problem_message: "Problem: {problem}\n\n" + this + INSTRUCTION.
TEACHER_CONTEXT = (
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n\n"
    "Study the reasoning of the reference solution until you understand why it works. Do not copy it: "
    "solve the problem yourself, step by step, and arrive independently at the same final answer.\n"
)


# ==================================================================================================
# ALGORITHM: the privileged teacher's prompt and its pass over the student's tokens
# ==================================================================================================
def fill_template(template: str, problem: str, solution: str = "") -> str:
    """A user message from a ``--student_template`` / ``--teacher_template``: ``{problem}`` and ``{solution}``
    replaced verbatim (no stripping, no instruction removal; other braces, e.g. ``\\boxed{}``, stay as they are)."""
    values = {"problem": problem, "solution": solution}  # one pass: a problem that contains "{solution}" stays as it is
    return re.sub(r"\{(problem|solution)\}", lambda m: values[m.group(1)], template)


def teacher_prompt(tokenizer, problem: str, solution: str, enable_thinking: bool = True, template: str | None = None) -> str:
    """The privileged teacher's rendered prompt (string; encode with ``add_special_tokens=False``). ``template``:
    the user message as ``fill_template`` fills it (e.g. the authors' wording, configs/qwen3-4b-pwopsd.yaml);
    None = ours, ``problem_message`` with ``TEACHER_CONTEXT``."""
    message = fill_template(template, problem, solution) if template is not None else \
        problem_message(problem, TEACHER_CONTEXT.format(solution=solution))
    return render_chat(tokenizer, message, enable_thinking)


def student_prompt_from(tokenizer, problem: str, enable_thinking: bool = False, template: str | None = None) -> str:
    """``rollout.student_prompt``, or with ``template`` the user message ``fill_template`` makes of it."""
    if template is None:
        return student_prompt(tokenizer, problem, enable_thinking)
    return render_chat(tokenizer, fill_template(template, problem), enable_thinking)


def render_problems(tokenizer, problems: list[dict], max_prompt_length: int, *, student_thinking: bool = False,
                    teacher_thinking: bool = True, limit: int | None = None, student_template: str | None = None,
                    teacher_template: str | None = None) -> tuple[list[dict], int]:
    """Both prompts of every problem, rendered and encoded once; problems with a prompt longer than
    ``max_prompt_length`` tokens are skipped (and counted), never truncated.

    Returns ``(kept, skipped)``: ``kept`` = the problem records plus ``student_ids`` / ``teacher_ids``
    (token id lists), in order, at most ``limit`` of them (the scan stops there). ``*_template``: see
    ``teacher_prompt`` / ``student_prompt_from``.
    """
    kept, skipped = [], 0
    for r in problems:
        s_ids = encode(tokenizer, student_prompt_from(tokenizer, r["problem"], student_thinking, student_template))
        t_ids = encode(tokenizer, teacher_prompt(tokenizer, r["problem"], r["solution"], teacher_thinking, teacher_template))
        if max(len(s_ids), len(t_ids)) > max_prompt_length:
            skipped += 1
            continue
        kept.append({**r, "student_ids": s_ids, "teacher_ids": t_ids})
        if limit is not None and len(kept) == limit:
            break
    return kept, skipped


# --------------------------------------------------------------------------------------------------
# PLUMBING: reaching the network inside DDP / DeepSpeed / peft wrappers
# --------------------------------------------------------------------------------------------------
def causal_lm(model):
    """The bare ``*ForCausalLM`` inside DDP / DeepSpeed / peft wrappers (LoRA layers stay injected)."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_weight(model) -> torch.Tensor:
    """The output projection ``[V, H]`` (tied to the input embeddings for SmolLM2 / small Qwen3)."""
    return causal_lm(model).get_output_embeddings().weight


# ALGORITHM (continued): the teacher / student pass over the student's own tokens
def completion_hidden_states(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                             packed: bool = True) -> torch.Tensor:
    """Final hidden states that predict each completion token, concatenated: ``[N, H]``, N = sum of completion lengths.

    Row ``j`` of sequence ``i`` is the decoder output at the position just before completion token
    ``j`` -- i.e. the lm_head input whose logits give ``p(y_j | prompt_i, y_<j)``.

    ``packed=True`` (default): the sequences ``[prompt_i + completion_i]`` are laid end to end in one row
    of ``sum(len)`` tokens with per-sequence ``position_ids`` (0, 1, ... restarting at each sequence) and
    no attention mask. transformers reads the restarts as packed sequences and builds the block-diagonal
    causal mask from them (SDPA / eager), or runs varlen flash attention -- so no linear layer computes on
    padding. ``packed=False``: right-padded ``[B, max len]`` batch with an attention mask (``pad_id``
    fills), kept for comparison; both give the same values up to float rounding.
    The model is called through its outermost wrapper (so DDP / DeepSpeed / FSDP see the forward) with
    ``logits_to_keep=1``, and the decoder output is taken by a forward hook: no ``[B, T, V]`` logits and
    no per-layer hidden-state copies. Gradients flow iff grad mode is on. Raises ``ValueError`` on an
    empty completion.
    """
    if any(len(c) == 0 for c in completions):
        raise ValueError("completion_hidden_states: empty completion (every rollout has at least one token)")
    seqs = [p + c for p, c in zip(prompts, completions)]
    device = lm_head_weight(model).device
    if packed:
        starts = [0]
        for s in seqs[:-1]:
            starts.append(starts[-1] + len(s))
        ids = torch.tensor([t for s in seqs for t in s])[None]
        inputs = dict(position_ids=torch.cat([torch.arange(len(s)) for s in seqs])[None].to(device))
        rows = torch.zeros(sum(map(len, completions)), dtype=torch.long)
        cols = torch.cat([torch.arange(o + len(p) - 1, o + len(p) + len(c) - 1)
                          for o, p, c in zip(starts, prompts, completions)])
    else:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        inputs = dict(attention_mask=mask.to(device))
        rows = torch.cat([torch.full((len(c),), i) for i, c in enumerate(completions)])
        cols = torch.cat([torch.arange(len(p) - 1, len(p) + len(c) - 1) for p, c in zip(prompts, completions)])
    captured = {}

    def hook(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = causal_lm(model).get_decoder().register_forward_hook(hook)
    try:
        model(input_ids=ids.to(device), **inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured["h"][rows.to(device), cols.to(device)]


# PLUMBING: the teacher network (adapter off, no grad)
@contextlib.contextmanager
def teacher_mode(model, frozen_copy=None, adapter: str | None = None):
    """Yield the network to use as the teacher: ``frozen_copy`` if given (full fine-tuning), else ``model``
    with its LoRA adapter disabled (= the initial policy), or with the peft adapter named ``adapter`` active
    instead of the student's (the EMA teacher). Always under ``torch.no_grad()``; on exit the student's
    adapter is active and trainable again, the other adapter frozen."""
    with torch.no_grad():
        if frozen_copy is not None:
            yield frozen_copy
            return
        peft_model = model
        while hasattr(peft_model, "module"):
            peft_model = peft_model.module
        if adapter is None:
            with peft_model.disable_adapter():
                yield peft_model
            return
        student = peft_model.active_adapter
        # inference_mode: switching must not make the teacher's adapter trainable (peft's default does).
        peft_model.set_adapter(adapter, inference_mode=True)
        try:
            yield peft_model
        finally:
            peft_model.set_adapter(student)


@dataclass
class TeacherArgs:
    model: str = arg("smollm2-135m", "HF id, local folder, or smollm2-135m")
    dataset: str = arg("demo-arithmetic", "anything data.load_problems reads")
    index: int = arg(0, "which problem", check=">= 0")
    max_new_tokens: int = arg(64, check="> 0")
    teacher_thinking: bool = arg(True)
    config: str | None = arg(None, "YAML file of these flags")


def main(argv=None):
    from transformers import AutoModelForCausalLM

    from data import load_problems, load_tokenizer
    from loss import clipped_forward_kl
    from rollout import generate_hf

    a = parse_config(TeacherArgs, argv, prog="teacher.py", description="Show the student/teacher prompts of a "
                     "problem and score one student rollout token by token (clipped forward KL).")
    r = load_problems(a.dataset, limit=a.index + 1)[a.index]
    tok, path = load_tokenizer(a.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    s_prompt, t_prompt = student_prompt(tok, r["problem"]), teacher_prompt(tok, r["problem"], r["solution"], a.teacher_thinking)
    print("=== student prompt ===\n" + s_prompt + "\n=== teacher prompt ===\n" + t_prompt)
    s_ids, t_ids = encode(tok, s_prompt), encode(tok, t_prompt)
    ro = generate_hf(model, tok, [s_ids], max_new_tokens=a.max_new_tokens)[0]
    with torch.no_grad():
        W = lm_head_weight(model)
        hs = completion_hidden_states(model, [s_ids], [ro.completion_ids], tok.pad_token_id)
        ht = completion_hidden_states(model, [t_ids], [ro.completion_ids], tok.pad_token_id)
        kl = clipped_forward_kl(hs @ W.T, ht @ W.T)
    print("=== student rollout, per-token clipped forward KL ===")
    for tid, v in zip(ro.completion_ids, kl.tolist()):
        print(f"{v:8.4f}  {tok.decode([tid])!r}")


if __name__ == "__main__":
    main()
