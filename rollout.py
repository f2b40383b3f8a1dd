"""Student rollouts: the student prompt and on-policy sampling (HF ``generate``; vLLM in ``vllm_*``).

The student sees only the problem (paper, Sec. 3 / OPSD):

    Problem: {problem}

    Please reason step by step, and put your final answer within \\boxed{}.

rendered as a user message with the tokenizer's chat template (``add_generation_prompt=True``,
``enable_thinking=student_thinking``). Templates that open a ``<think>`` block themselves
(DeepSeek-R1-Distill, Olmo-3-Think) get ``</think>\\n\\n`` appended when student thinking is off.

Generation works on token ids in and token ids out: the completion the teacher scores and the loss
trains on is exactly what was sampled -- no decode / re-encode round trip.

    python rollout.py --model smollm2-135m --dataset demo-arithmetic --num_prompts 4
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

STUDENT_TEMPLATE = "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass
class Rollout:
    """One sampled completion. ``completion_ids`` includes the final EOS when the model stopped."""
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool  # hit max_new_tokens without EOS
    logprobs: list[float] | None = field(default=None, repr=False)  # sampled-token log-probs (vLLM only)


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


def student_prompt(tokenizer, problem: str, enable_thinking: bool = False) -> str:
    """The student's rendered prompt for ``problem`` (string; encode with ``add_special_tokens=False``)."""
    return render_chat(tokenizer, STUDENT_TEMPLATE.format(problem=problem), enable_thinking)


def encode(tokenizer, text: str) -> list[int]:
    # The chat template already contains BOS/special tokens: never add them twice.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """EOS ids to stop at: the tokenizer's EOS plus the generation config's (e.g. <|im_end|>, <|endoftext|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen] if gen is not None else [])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 1024,
                temperature: float = 1.1, top_p: float = 0.95, top_k: int = 20, seed: int = 0,
                batch_size: int = 64, eos_ids: list[int] | None = None) -> list[Rollout]:
    """Sample one completion per prompt with HF ``generate`` (left padding; ``temperature`` 0 = greedy).

    Args:
        model: a causal LM (plain or peft-wrapped; the adapter, if enabled, is used).
        prompts: rendered prompt token ids, one list per prompt.
        top_k: 0 or negative disables top-k.
        seed: ``torch.manual_seed(seed)`` is set first, so the same seed gives the same samples.
    Returns:
        one ``Rollout`` per prompt, in order; completions end at (and include) the first EOS, padding
        removed, so ``len(completion_ids)`` is the true response length even when pad == eos.
    """
    eos_ids = eos_ids or stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[Rollout] = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b : b + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding so every row continues at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else None) \
            if temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True, **sampling)
        for p, row in zip(chunk, gen[:, width:].tolist()):
            stop = next((j for j, t in enumerate(row) if t in eos_ids), None)
            out.append(Rollout(p, row[: stop + 1] if stop is not None else row, truncated=stop is None))
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------------
# vLLM backend (colocated engine, in-place weight sync) -- see issue #3.
# --------------------------------------------------------------------------------------------------
def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data import load_problems, resolve_model

    p = argparse.ArgumentParser(description="Sample student rollouts and print them.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="demo-arithmetic")
    p.add_argument("--num_prompts", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.1)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=20)
    p.add_argument("--student_thinking", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    problems = load_problems(a.dataset, limit=a.num_prompts, require_solution=False)
    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [encode(tok, student_prompt(tok, r["problem"], a.student_thinking)) for r in problems]
    t0 = time.time()
    rollouts = generate_hf(model, tok, prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                           top_p=a.top_p, top_k=a.top_k, seed=a.seed)
    for r, ro in zip(problems, rollouts):
        print(f"--- {r['id']} (answer {r['answer']}, {len(ro.completion_ids)} tokens, truncated={ro.truncated})")
        print(tok.decode(ro.completion_ids))
    print(f"{sum(len(r.completion_ids) for r in rollouts) / (time.time() - t0):.1f} tokens/s")


if __name__ == "__main__":
    main()
