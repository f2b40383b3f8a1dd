"""The privileged teacher: its prompt, and the forward pass that scores the student's own tokens.

Teacher = the frozen initial policy (under LoRA: the network with its adapter disabled) shown the problem *and a
reference solution* (OPSD, arXiv:2601.18734, Sec. 3). It reads the student's completion unchanged after its own
prompt, so position k of the completion is scored by

    teacher:  p_T(. | teacher_prompt, y_<k)        student:  p_S(. | student_prompt, y_<k)

Both passes return the *final hidden states* at the completion positions ([N, H], N = completion tokens of the
batch): the loss applies the lm_head chunk by chunk, so a [B, T, V] logits tensor never exists.

    python teacher.py --model smollm2-135m --dataset demo-arithmetic   # show prompts + per-token KL
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pwopsd.cli import arg, load_or_exit, load_tokenizer, parse_config
from pwopsd.engine import causal_lm, generate_hf, lm_head_weight  # the network / its lm_head inside wrappers
from pwopsd.packing import pack, pad
from rollout import encode, fill_template, problem_message, render_chat, student_prompt

# The teacher's message (rollout.problem_message): "Problem: {problem}\n\n" + this + rollout.INSTRUCTION.
TEACHER_CONTEXT = (
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n\n"
    "Study the reasoning of the reference solution until you understand why it works. Do not copy it: "
    "solve the problem yourself, step by step, and arrive independently at the same final answer.\n"
)


def teacher_prompt(tokenizer, problem: str, solution: str, enable_thinking: bool = True, template: str | None = None) -> str:
    """The privileged teacher's rendered prompt (string; encode with ``add_special_tokens=False``); ``template``: see fill_template."""
    message = (problem_message(problem, TEACHER_CONTEXT.format(solution=solution)) if template is None
               else fill_template(template, problem, solution))
    return render_chat(tokenizer, message, enable_thinking)


def render_problems(tokenizer, problems: list[dict], max_prompt_length: int, *, student_thinking: bool = False,
                    teacher_thinking: bool = True, limit: int | None = None, student_template: str | None = None,
                    teacher_template: str | None = None) -> tuple[list[dict], int]:
    """Both prompts of every problem, rendered and encoded once -> ``(kept, skipped)``: ``kept`` = the records plus
    ``student_ids`` / ``teacher_ids``, at most ``limit``; a prompt over ``max_prompt_length`` tokens is skipped, counted."""
    kept, skipped = [], 0
    for r in problems:
        s_ids = encode(tokenizer, student_prompt(tokenizer, r["problem"], student_thinking, student_template))
        t_ids = encode(tokenizer, teacher_prompt(tokenizer, r["problem"], r["solution"], teacher_thinking, teacher_template))
        if max(len(s_ids), len(t_ids)) > max_prompt_length:
            skipped += 1
            continue
        kept.append({**r, "student_ids": s_ids, "teacher_ids": t_ids})
        if limit is not None and len(kept) == limit:
            break
    return kept, skipped


def completion_hidden_states(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                             packed: bool = True) -> torch.Tensor:
    """Final hidden states that predict each completion token, concatenated: ``[N, H]``, N = sum of completion lengths.

    Row ``j`` of sequence ``i`` is the decoder output just before completion token ``j``: the lm_head input whose
    logits give ``p(y_j | prompt_i, y_<j)``. The sequences ``prompt_i + completion_i`` are packed into one row
    (``packed=False``: a right-padded batch; same values up to rounding, pwopsd/packing.py); the decoder output is
    taken by a hook with ``logits_to_keep=1``, so no ``[B, T, V]`` logits exist. Gradients flow iff grad mode is on.
    Raises ``ValueError`` on an empty completion.
    """
    if any(len(c) == 0 for c in completions):
        raise ValueError("completion_hidden_states: empty completion (every rollout has at least one token)")
    device = lm_head_weight(model).device
    ids, inputs, rows, cols = (pack if packed else pad)(prompts, completions, pad_id)
    captured = {}

    def hook(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = causal_lm(model).get_decoder().register_forward_hook(hook)
    try:  # through the outermost wrapper, so DDP / DeepSpeed / FSDP see the forward
        model(input_ids=ids.to(device), **{k: v.to(device) for k, v in inputs.items()}, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured["h"][rows.to(device), cols.to(device)]


@contextlib.contextmanager
def teacher_mode(model, frozen_copy=None, adapter: str | None = None):
    """The teacher network, under ``torch.no_grad()``: ``frozen_copy`` (full fine-tuning), else ``model`` with its LoRA
    adapter disabled (= the initial policy) or with the peft adapter ``adapter`` active (the EMA teacher)."""
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

    from data import load_problems
    from loss import clipped_forward_kl

    a = parse_config(TeacherArgs, argv, prog="teacher.py", description="Show the student/teacher prompts of a "
                     "problem and score one student rollout token by token (clipped forward KL).")
    r = load_or_exit("teacher.py", load_problems, a.dataset, limit=a.index + 1, index=a.index)[a.index]
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
