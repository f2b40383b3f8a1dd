"""The sampling engine every stage uses: a ``vllm.LLM`` in this process, or an HF causal LM sampled with ``generate``.

Try not to modify: every stage's seeds and numbers depend on it. ``make_engine`` starts an ``Engine``;
``rollout.generate`` samples from it (token ids in, ``[prompt][sample]`` ``Rollout``s out; sampling settings,
seeds and token budgets per call). Under training the vLLM copy of the policy is kept current by ``sync_weights``
after each optimizer step (merged weights in place, or the LoRA adapter); the HF engine samples the live policy.
Also here: vLLM's CPU recipe, sleep mode on CUDA, and HF's top-k -> top-p as a vLLM logits processor
(``hf_top_k_top_p``). Notes and measurements: docs/notes.md.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch

from pwopsd.cli import load_tokenizer, resolve_dtype

@dataclass
class Rollout:
    """One sampled completion. ``completion_ids`` includes the final EOS when the model stopped."""
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool  # hit the token budget without EOS
    logprobs: list[float] | None = field(default=None, repr=False)  # sampled-token log-probs (vLLM only)


# HF generate
def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """EOS ids to stop at: the tokenizer's EOS plus the generation config's (e.g. <|im_end|>, <|endoftext|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen] if gen is not None else [])
    return sorted(i for i in ids if i is not None)


@contextlib.contextmanager
def neutral_generation_config(model):
    """For the block, the model's generation config is transformers' neutral default.

    ``generate`` fills every field a call leaves unset from ``model.generation_config`` -- a checkpoint's
    ``generation_config.json`` may set ``repetition_penalty``, ``min_p``, ``typical_p``, ``no_repeat_ngram_size``,
    ``min_new_tokens``, ``bad_words_ids``, ... -- so rollouts would follow a distribution the loss and vLLM do
    not know about. Inside this block only what ``generate_hf`` passes (temperature, top_p, top_k,
    max_new_tokens, the stop and pad ids) shapes sampling, as in the vLLM engine. (A peft model generates
    through its base model, whose config is the one swapped.)
    """
    from transformers import GenerationConfig

    net = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(net, "generation_config", None)
    if saved is None:  # not a transformers model (a test double): nothing to neutralise
        yield
        return
    net.generation_config = GenerationConfig()
    try:
        yield
    finally:
        net.generation_config = saved


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 1024,
                temperature: float = 1.1, top_p: float = 0.95, top_k: int = 20, seed: int = 0,
                batch_size: int = 64, eos_ids: list[int] | None = None) -> list[Rollout]:
    """The HF backend of ``generate``: one completion per prompt with HF ``generate`` (left padding; ``temperature``
    0 = greedy).

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
        # top_k 0 = off must be said: an unset top_k is transformers' default 50
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=max(top_k, 0)) \
            if temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        with neutral_generation_config(model):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True, **sampling)
        for p, row in zip(chunk, gen[:, width:].tolist()):
            stop = next((j for j, t in enumerate(row) if t in eos_ids), None)
            out.append(Rollout(p, row[: stop + 1] if stop is not None else row, truncated=stop is None))
    model.train(was_training)
    return out


# ==================================================================================================
# PLUMBING: the sampling engine (try not to modify: every stage's seeds and numbers depend on it)
# ==================================================================================================
def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str) -> str:
    """``auto`` -> ``vllm`` when importable, else ``hf``; ``vllm`` / ``hf`` unchanged."""
    return ("vllm" if vllm_available() else "hf") if name == "auto" else name


@dataclass
class Engine:
    """A sampler: a ``vllm.LLM`` in this process or an HF causal LM, plus what ``generate`` needs."""
    backend: str                   # "vllm" | "hf"
    tokenizer: object              # the HF tokenizer: pad id of HF batches; decoding for callers
    stop_ids: list[int]            # completions end at (and include) the first of these
    max_model_len: int             # prompt + completion tokens must fit (HF: max_position_embeddings)
    llm: object = None             # vllm backend: the vllm.LLM
    model: object = None           # hf backend: the causal LM (under training: the live policy itself)
    sleep_mode: bool = False       # colocated vLLM on CUDA: release GPU memory during the train pass
    asleep: set[str] = field(default_factory=set)  # released memory tags: "weights", "kv_cache"
    sync_s: list[float] = field(default_factory=list)  # seconds of every weight sync (for the log/bench)
    hf_top_k_top_p: bool = False   # vLLM on CPU: top-k -> top-p runs in hf_sampling_processor(), not vLLM's sampler
    sync_mode: str = "merged"      # vllm: how sync_weights pushes a LoRA policy: "merged" W + s B A | "adapter" (see SYNC_MODES)
    lora: object = None            # adapter mode: the vllm LoRARequest every generate passes (None: the base alone)
    lora_dir: str | None = None    # adapter mode: the engine's own temporary folder of synced adapters (removed by close)


def make_engine(backend: str, model_path: str | None = None, *, model=None, tokenizer=None, dtype="auto",
                max_model_len: int | None = None, seed: int = 0, gpu_memory_utilization: float = 0.9,
                kv_cache_gib: float = 1.0, colocated: bool = False, accelerator=None, lora_rank: int | None = None,
                sleep: bool = False, **vllm_kwargs) -> Engine:
    """Start the sampler on ``model_path``: ``backend`` ``vllm``, ``hf`` or ``auto`` (vllm when importable).

    Args:
        model: an HF model already in memory. hf: the model that samples (not copied: a training policy
            samples its live weights). vllm: only its dtype and generation config are read (the engine runs
            in the model's dtype, so synced weights are copied, not cast).
        tokenizer: the HF tokenizer (default: ``model_path``'s); vLLM loads the same files.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), a name of ``cli.DTYPES`` or a torch dtype;
            used when no ``model`` is given.
        max_model_len: prompt + completion tokens; default the model's own context length.
        seed: vLLM's engine seed (+ the process index with ``accelerator``); every request is seeded
            anyway (``generate``).
        gpu_memory_utilization: vLLM on CUDA: its share of GPU memory (weights + KV cache).
        kv_cache_gib: vLLM on CPU: KV cache size (``VLLM_CPU_KVCACHE_SPACE``, if set, wins).
        sleep: colocated vLLM on CUDA: sleep mode (``sleep`` before each train pass; off by default, as in the
            official runs -- TRL's colocate default).
        colocated: the engine shares its process and GPU with training: vLLM's extensible KV cache off (it
            would set the process's CUDA memory fraction), and with several processes vLLM's ``external_launcher`` (one tensor-parallel-1 engine per rank in the existing
            process group). ``VLLM_ENABLE_V1_MULTIPROCESSING`` must then be 0 (the weight sync hands the
            engine a Python generator of tensors, which only works in-process): RuntimeError otherwise.
        accelerator: rank and world size for ``colocated`` (engine seed ``seed + rank``).
        lora_rank: vllm: serve a LoRA adapter of up to this rank next to the frozen base (``lora_engine_kwargs``;
            ``sync_mode`` "adapter": ``sync_weights`` then pushes the adapter, ``serve_adapter`` names one on disk).
        vllm_kwargs: passed to ``vllm.LLM`` (e.g. ``trust_remote_code``, ``logits_processors``;
            ``logprobs_mode="processed_logprobs"``: ``generate(logprobs=True)`` then reports log-probs under the
            distribution sampled -- tempered, top-k / top-p filtered, this file's processor included -- not raw).
    The CPU recipe (vllm-cpu) lives here and only here: the engine in this process, eager mode (torch.compile
    warm-up costs minutes on 2 cores), chunked prefill off (vllm-cpu crashes with ``CPU Generator does
    not use offset`` when a request with its own seed is split by chunked prefill, and per-request seeds
    are what make resumed runs sample the same), the KV cache sized in bytes (vllm-cpu reads
    ``gpu_memory_utilization`` as a share of RAM), and a step budget of at least 4096 tokens.
    """
    backend = resolve_backend(backend)
    if backend == "hf":
        return _hf_engine(model_path, model, tokenizer, dtype, max_model_len)
    if backend != "vllm":
        raise ValueError(f"unknown rollout backend {backend!r} (choose from auto, vllm, hf)")
    if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0" and colocated:
        raise RuntimeError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0: the weight sync needs the engine in this process")
    on_cuda = torch.cuda.is_available()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    vllm_kwargs = {**platform_kwargs(on_cuda, colocated and on_cuda, world, gpu_memory_utilization, kv_cache_gib,
                                     max_model_len, sleep=sleep), **vllm_kwargs}
    if lora_rank:
        vllm_kwargs.update(lora_engine_kwargs(lora_rank))
    if tokenizer is None:
        tokenizer, _ = load_tokenizer(model_path, trust_remote_code=vllm_kwargs.get("trust_remote_code", False))
    from vllm import LLM

    # Sampling comes from our SamplingParams alone: "vllm" = neutral defaults, no server-wide caps (e.g. a
    # max_new_tokens) taken from the checkpoint's generation_config.json. Its EOS ids are still read (stop ids).
    vllm_kwargs.setdefault("generation_config", "vllm")
    # Its weight-loading bar is start-up chatter like its INFO lines: shown only when those are (console.quiet_logs).
    vllm_kwargs.setdefault("use_tqdm_on_load", os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() in ("DEBUG", "INFO"))
    llm = LLM(model=model_path, tokenizer=tokenizer.name_or_path, tensor_parallel_size=1, seed=seed + rank,
              dtype=next(model.parameters()).dtype if model is not None else resolve_dtype(dtype),
              max_model_len=max_model_len, **vllm_kwargs)
    config = getattr(model, "generation_config", None) if model is not None else _generation_config(model_path)
    return Engine("vllm", tokenizer, stop_token_ids(tokenizer, config), llm.llm_engine.model_config.max_model_len,
                  llm=llm, sleep_mode=bool(vllm_kwargs.get("enable_sleep_mode")),
                  # never builds the processor (its vLLM module differs between versions: CUDA never needs it)
                  hf_top_k_top_p=hf_sampling_processor.cache_info().currsize > 0
                  and hf_sampling_processor() in vllm_kwargs.get("logits_processors", []),
                  sync_mode="adapter" if lora_rank else "merged",
                  lora_dir=adapter_dir() if lora_rank else None)


def platform_kwargs(on_cuda: bool, colocated: bool, world: int, gpu_memory_utilization: float, kv_cache_gib: float,
                    max_model_len: int | None, sleep: bool = False) -> dict:
    """``vllm.LLM`` arguments of the platform (see ``make_engine``; the caller's own arguments win): CUDA = its
    memory share; when colocated: sleep mode if ``sleep``, the extensible KV cache off where the installed vLLM
    has it, ``external_launcher`` with several processes; CPU = the vllm-cpu recipe. Never imports the CPU
    logits processor on CUDA."""
    if on_cuda:
        kw = {"gpu_memory_utilization": gpu_memory_utilization}
        if colocated:
            if sleep:
                kw["enable_sleep_mode"] = True
            # vLLM >= 0.34 grows its KV cache on demand and caps this process's CUDA memory fraction for it:
            # the training pass shares the process, so keep the fixed, preallocated cache.
            kw.update(supported_engine_kwargs(enable_extensible_kv_cache=False))
            if world > 1:  # join the training process group instead of starting a private one
                kw["distributed_executor_backend"] = "external_launcher"
        return kw
    kw = {"enforce_eager": True, "enable_chunked_prefill": False, "kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30)),
          # vllm-cpu sorts the whole vocabulary per row and step when top-k and top-p are both set; this
          # processor samples the same distribution sorting only the top-k logits (see hf_top_k_top_p).
          "logits_processors": [hf_sampling_processor()]}
    if max_model_len:
        kw["max_num_batched_tokens"] = max(max_model_len, 4096)
    return kw


def supported_engine_kwargs(**kwargs) -> dict:
    """The ``kwargs`` the installed vLLM's ``EngineArgs`` has a field for (an option of a newer version is dropped)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return {k: v for k, v in kwargs.items() if k in names}


def _hf_engine(model_path, model, tokenizer, dtype, max_model_len) -> Engine:
    if model is None:
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(dtype)).to(device).eval()
    if tokenizer is None:
        tokenizer, _ = load_tokenizer(model_path)
    context = max_model_len or getattr(model.config, "max_position_embeddings", None) or 1 << 30
    return Engine("hf", tokenizer, stop_token_ids(tokenizer, getattr(model, "generation_config", None)), context,
                  model=model)


def _generation_config(model_path: str):
    """The generation config HF would give the model (its file, else one derived from config.json)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:
        try:
            return GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_path))
        except (OSError, ValueError):
            return None


def _generate_hf_engine(engine, prompts, n, seeds, budgets, temperature, top_p, top_k, _logprobs, progress):
    flat = [p for p in prompts for _ in range(n)]
    steps = min(max(budgets), engine.max_model_len - max(map(len, prompts)))
    rollouts = generate_hf(engine.model, engine.tokenizer, flat, max_new_tokens=steps, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seeds if isinstance(seeds, int) else seeds[0],
                           batch_size=len(flat), eos_ids=engine.stop_ids)
    if progress is not None:
        progress.update(n * sum(budgets))
    return [[_cut(rollouts[i * n + j], budgets[i]) for j in range(n)] for i in range(len(prompts))]


def _cut(r: Rollout, budget: int) -> Rollout:
    return r if len(r.completion_ids) <= budget else Rollout(r.prompt_ids, r.completion_ids[:budget], truncated=True)


def _generate_vllm(engine, prompts, n, seeds, budgets, temperature, top_p, top_k, logprobs, progress):
    from vllm import SamplingParams

    _wake(engine, "weights", "kv_cache")
    if isinstance(seeds, int):
        rng = random.Random(seeds)
        seeds = [rng.getrandbits(62) for _ in prompts]
    # top-k -> top-p in the engine's logits processor when it has one (sorts k logits, not the vocabulary).
    ours = engine.hf_top_k_top_p and temperature > 0 and top_k > 0
    extra = {HF_TOPK_TOPP: [top_k, top_p]} if ours else None
    params = [SamplingParams(n=n, max_tokens=b, temperature=temperature,
                             top_p=top_p if temperature > 0 and not ours else 1.0,
                             top_k=top_k if (top_k > 0 and temperature > 0 and not ours) else 0, seed=s,
                             stop_token_ids=engine.stop_ids, logprobs=0 if logprobs else None, detokenize=False,
                             extra_args=extra)
              for b, s in zip(budgets, seeds)]
    outs = _run_requests(engine.llm, [{"prompt_token_ids": list(p)} for p in prompts], params, engine.lora, progress)
    groups = []
    for p, o in zip(prompts, outs):
        group = []
        for c in sorted(o.outputs, key=lambda c: c.index):
            lp = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)] if logprobs else None
            group.append(Rollout(list(p), list(c.token_ids), truncated=c.finish_reason == "length", logprobs=lp))
        groups.append(group)
    return groups


def _run_requests(llm, prompts: list[dict], params: list, lora=None, progress=None) -> list:
    """``llm.generate(prompts, params, lora_request=lora)`` (its own bar off); with ``progress``, the same engine loop
    run here, adding after every step the token budget used up so far (see ``generate``). Outputs in prompt order."""
    if progress is None:
        return llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    llm.enqueue(prompts, params, lora_request=lora, use_tqdm=False)
    total, shown, outs = sum(p.n * p.max_tokens for p in params), 0, []
    while llm.llm_engine.has_unfinished_requests():
        outs += [out for out in llm.llm_engine.step() if out.finished]
        left = _budget_left(llm)
        done = 0 if left is None else total - left
        if done > shown:
            progress.update(done - shown)
            shown = done
    if total > shown:
        progress.update(total - shown)
    return sorted(outs, key=lambda o: int(o.request_id))  # request ids count up in submission order


def _budget_left(llm) -> int | None:
    """Tokens of budget the engine's unfinished samples have not generated yet (each sample, n > 1 included, is one
    entry of vLLM's output processor; queued ones count whole). Reads vLLM internals: if they move, None is
    returned and the bar advances once, at the end of the call."""
    try:
        states = llm.llm_engine.output_processor.request_states.values()
        return sum(max(s.max_tokens_param - s.detokenizer.num_output_tokens(), 0) for s in states)
    except AttributeError:
        return None


def _wake(engine: Engine, *tags: str):
    # vLLM requires weights before KV cache; the scheduler resumes once everything is resident.
    todo = [t for t in ("weights", "kv_cache") if t in tags and t in engine.asleep]
    if todo:
        engine.llm.wake_up(tags=todo)
        engine.asleep -= set(todo)


def sleep(engine: Engine):
    """Before the train pass (colocated vLLM on CUDA): drop the KV cache and offload the weights to CPU
    (sleep level 1). No-op on CPU (vllm-cpu has no sleep mode) and for HF. The next ``sync_weights`` /
    ``generate`` wakes the engine."""
    if engine.sleep_mode and not engine.asleep:
        engine.llm.sleep(level=1)
        engine.asleep = {"weights", "kv_cache"}


def close(engine: Engine | None):
    """Shut a vLLM engine down: frees its memory and the torch.distributed groups it created.

    Call before ``accelerator.end_training()``: that destroys the default process group (in a single
    process, the one vLLM made), after which vLLM's own exit hook fails with "Invalid process group".
    No-op for HF and ``None``.
    """
    if engine is not None and engine.llm is not None:
        engine.llm.llm_engine.engine_core.shutdown()
    if engine is not None and engine.lora_dir:
        shutil.rmtree(engine.lora_dir, ignore_errors=True)


# The samplers behind rollout.generate, by backend.
SAMPLERS = {"vllm": _generate_vllm, "hf": _generate_hf_engine}


# --------------------------------------------------------------------------------------------------
# PLUMBING: weight sync into a colocated vLLM engine (streamed, out of place, in-place reload).
#
# One engine per training process, *inside* that process (V1 multiprocessing off), tensor parallel 1:
# every rank samples its own prompts from its own copy of the policy (paper: colocated vLLM, one rollout
# per prompt). After an optimizer step the new weights are streamed into the engine one tensor at a time
# through vLLM's in-place reload (``Worker.reload_weights``), which also redoes vLLM's post-load weight
# processing. That matters: vLLM-CPU repacks every linear weight for oneDNN at load time and drops the
# original, so copying into the engine's parameters would change nothing the kernels read.
# --------------------------------------------------------------------------------------------------
# Reaching the network inside DDP / DeepSpeed / peft wrappers (the teacher pass, the loss's lm_head).
def causal_lm(model):
    """The bare ``*ForCausalLM`` inside DDP / DeepSpeed / peft wrappers (LoRA layers stay injected)."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_weight(model) -> torch.Tensor:
    """The output projection ``[V, H]`` (tied to the input embeddings for SmolLM2 / small Qwen3)."""
    return causal_lm(model).get_output_embeddings().weight


@contextlib.contextmanager
def full_tensors(params):
    """Read possibly sharded parameters whole, outside the model's forward (the vLLM weight sync, the loss's lm_head).

    Yields ``full``: ``full(t)`` is the whole tensor of ``t`` -- one of ``params``, or a tensor computed from them
    inside the block (a LoRA delta) -- safe to keep after the block:
    - DeepSpeed ZeRO-3: ``params`` are gathered in place on every rank for the block (collective: every rank must
      enter), and ``full`` returns a detached copy (the gathered storage is released on exit);
    - FSDP2 DTensors: ``t.full_tensor()``, detached (collective);
    - anything else: ``t`` itself, no copy (a trainable tensor keeps its gradient).
    """
    params = list(params)
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)

    def full(t: torch.Tensor) -> torch.Tensor:
        if hasattr(t, "full_tensor"):
            return t.full_tensor().detach()
        return t.detach().clone() if hasattr(t, "ds_id") else t

    with gather:
        yield full


def policy_weights(model, accelerator=None):
    """Yield ``(name, tensor)`` of the current policy in HF checkpoint names, one tensor at a time.

    Full fine-tuning: the parameters as they are. LoRA (peft): each adapted layer yields its merged
    weight ``W + (alpha/r) B A`` (peft's ``get_delta_weight``), computed out of place per layer; the
    LoRA tensors themselves are not yielded and names lose peft's ``base_model.model.`` / ``base_layer.``.
    Out of place instead of ``merge_adapter()`` / ``unmerge_adapter()``: W + d - d is not W in floating
    point, and W is the frozen teacher -- the sync must not drift it. Peak extra memory: one layer's weight.
    Under ZeRO-3 each layer's shards are gathered just before it is yielded (collective: every rank must
    consume the whole iterator); FSDP2 DTensors are gathered per tensor. Tied weights appear once.
    ``accelerator`` only unwraps DDP / DeepSpeed / FSDP wrappers.
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
            with full_tensors(module.parameters()) as full:
                w = full(module.base_layer.weight).detach()
                if not module.disable_adapters and not module.merged:
                    for a in module.active_adapters:
                        if module.use_dora.get(a, False):
                            raise NotImplementedError(f"{mname}: syncing DoRA adapters into vLLM is not supported")
                        if a in module.lora_A:
                            w = w + full(module.get_delta_weight(a)).to(w.dtype)
                yield f"{mname}.weight", w
                if getattr(module.base_layer, "bias", None) is not None:
                    yield f"{mname}.bias", full(module.base_layer.bias).detach()
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or ".original_module" in f".{mname}":  # tied duplicate / peft's frozen copy
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}".lstrip(".")
            for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "modules_to_save.default."):
                name = name.replace(junk, "")
            with full_tensors([p]) as full:
                yield name, full(p).detach()


@torch.no_grad()
def sync_weights(engine: Engine, model, accelerator=None) -> float:
    """Push the policy's current weights into a vLLM engine, in place, then reset its prefix cache.

    ``engine.sync_mode`` "merged": streams ``policy_weights(model, accelerator)`` (one tensor at a time, no
    state-dict copy) through vLLM's ``reload_weights``, which maps HF names onto vLLM's fused layers (qkv_proj,
    gate_up_proj) and reprocesses each layer once all its tensors arrived. "adapter": ``sync_adapter`` (the
    LoRA tensors only; the engine's base stays the frozen initial weights). Cached prefixes hold K/V of the
    old weights, so the prefix cache is reset. On CUDA with the engine asleep: weights are woken first, loaded,
    then the KV cache. Collective under ZeRO-3 / FSDP (every rank syncs its own engine). Returns the seconds
    taken (also appended to ``engine.sync_s``); an HF engine samples the live model, so there it is a no-op
    returning 0. Raises vLLM's ValueError on a name the engine's model does not have.
    """
    if engine.backend != "vllm":
        return 0.0
    t0 = time.perf_counter()
    _wake(engine, "weights")
    fsdp1 = contextlib.nullcontext()
    if accelerator is not None and accelerator.distributed_type.name == "FSDP" and not getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        fsdp1 = FSDP.summon_full_params(model, writeback=False)  # FSDP1 cannot gather tensor by tensor
    with fsdp1:
        if engine.sync_mode == "adapter":
            sync_adapter(engine, model, accelerator)
        else:
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model, accelerator),
                                                                "is_checkpoint_format": True})
    _wake(engine, "kv_cache")
    engine.llm.reset_prefix_cache()
    engine.sync_s.append(time.perf_counter() - t0)
    return engine.sync_s[-1]


# --------------------------------------------------------------------------------------------------
# PLUMBING: adapter sync -- the engine applies the LoRA itself, next to its frozen base weights.
#
# Merged sync rounds W + (alpha/r) B A to the weights' dtype. In bf16 (8 significant bits) an update
# smaller than half a unit in the last place of W vanishes, and a LoRA update of the paper's size
# (lr 5e-6) mostly is: the engine would sample a policy the trainer never computed (README, "Which
# policy the engine samples"). vLLM's LoRA support computes x W^T + s (x A^T) B^T, as peft does, so
# only the adapter's own (relative) rounding remains. vLLM loads adapters from a folder by id: every
# sync writes a new folder under the engine's ``lora_dir`` and a new ``lora_int_id`` (vLLM caches by
# id, and its prefix cache keys on the adapter's name and path).
# --------------------------------------------------------------------------------------------------
SYNC_MODES = ("auto", "adapter", "merged")


def sync_mode(requested: str, model) -> str:
    """``requested`` (``SYNC_MODES``) -> ``adapter`` | ``merged`` for this policy.

    ``auto``: adapter for a LoRA (peft) policy whose base weights are 16-bit (bf16 / fp16: a merged update is
    mostly rounded away); merged in float32 (W + s B A is exact enough there, and vllm-cpu decodes 8-10x slower
    with LoRA kernels: README, "Which policy the engine samples") and for full fine-tuning (no adapter). Raises ValueError for
    ``adapter`` on a model without a LoRA adapter.
    """
    from peft.tuners.lora import LoraLayer

    layer = next((m for m in model.modules() if isinstance(m, LoraLayer)), None)
    if requested == "adapter" and layer is None:
        raise ValueError("adapter sync needs a LoRA (peft) policy")
    if requested != "auto":
        return requested
    return "adapter" if layer is not None and layer.base_layer.weight.element_size() == 2 else "merged"


def lora_engine_kwargs(rank: int) -> dict:
    """vLLM arguments to serve one LoRA adapter of rank ``rank`` next to the base: ``enable_lora``,
    ``max_lora_rank`` (the smallest rank vLLM accepts that is >= ``rank``), ``max_loras`` 1.
    Raises ValueError above vLLM's largest rank."""
    import typing

    from vllm.config.lora import MaxLoRARanks

    ranks = [r for r in typing.get_args(MaxLoRARanks) if r >= rank]
    if not ranks:
        raise ValueError(f"LoRA rank {rank} is above vLLM's largest ({max(typing.get_args(MaxLoRARanks))})")
    return dict(enable_lora=True, max_lora_rank=min(ranks), max_loras=1)


def adapter_tensors(model, accelerator=None):
    """Yield ``(name, tensor)`` of the policy's active LoRA adapter, in peft's saved names
    (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, ``[r, in]`` / ``[out, r]``, the
    adapter's dtype), one layer at a time. ZeRO-3 shards are gathered per layer (collective: every rank must
    consume the whole iterator), FSDP2 DTensors per tensor. ``accelerator`` only unwraps wrappers.
    Raises NotImplementedError for DoRA or several active adapters, ValueError for a merged adapter.
    """
    from peft.tuners.lora import LoraLayer

    net = accelerator.unwrap_model(model) if accelerator is not None else model
    for mname, module in net.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        if module.merged:
            raise ValueError(f"{mname}: the adapter is merged into the base weight; unmerge it before an adapter sync")
        if len(active) != 1 or module.use_dora.get(active[0], False):
            raise NotImplementedError(f"{mname}: adapter sync supports one active non-DoRA LoRA adapter, got {active}")
        for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
            mname = mname.replace(junk, "")
        a, b = module.lora_A[active[0]].weight, module.lora_B[active[0]].weight
        with full_tensors([a, b]) as full:
            yield f"{mname}.lora_A.weight", full(a).detach()
            yield f"{mname}.lora_B.weight", full(b).detach()


def adapter_dir() -> str:
    """A new temporary folder for an engine's synced adapters: removed by ``close``, or at exit when a run dies
    first (a 4B model's r 64 adapter is ~0.3 GB per sync)."""
    folder = tempfile.mkdtemp(prefix="pw-opsd-lora-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def sync_adapter(engine: Engine, model, accelerator=None):
    """Write the policy's adapter (``adapter_tensors``, cast to the engine's LoRA dtype, as vLLM would cast
    it on load; ``adapter_config.json`` from peft) to a new folder under ``engine.lora_dir`` and serve it.
    Collective under ZeRO-3. Raises ValueError when the model has no LoRA adapter."""
    from safetensors.torch import save_file

    net = accelerator.unwrap_model(model) if accelerator is not None else model
    dtype = engine.llm.llm_engine.vllm_config.lora_config.lora_dtype
    tensors = {n: t.to("cpu", dtype).contiguous() for n, t in adapter_tensors(net)}
    if not tensors:
        raise ValueError("adapter sync: the policy has no LoRA adapter")
    folder = os.path.join(engine.lora_dir, f"sync-{engine.lora.lora_int_id + 1 if engine.lora else 1}")
    net.peft_config[net.active_adapter].save_pretrained(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    old = engine.lora.lora_path if engine.lora else None
    serve_adapter(engine, folder)
    if old and os.path.dirname(old) == engine.lora_dir:  # loaded into the engine: the files are no longer read
        shutil.rmtree(old, ignore_errors=True)


def serve_adapter(engine: Engine, folder: str):
    """From now on every ``generate`` on ``engine`` (started with ``lora_rank``) applies the peft adapter in
    ``folder``: a new ``LoRARequest`` id (so vLLM loads it, now: the cost belongs to the sync), the previous
    adapter dropped from the engine."""
    from vllm.lora.request import LoRARequest

    old = engine.lora
    n = old.lora_int_id + 1 if old else 1
    if old is not None:
        engine.llm.llm_engine.remove_lora(old.lora_int_id)
    engine.lora = LoRARequest(f"policy-{n}", n, folder)
    engine.llm.llm_engine.add_lora(engine.lora)


# --------------------------------------------------------------------------------------------------
# HF's top-k -> top-p inside vLLM, as a v1 logits processor (vLLM's public extension point).
#
# With top_k and top_p both set, vllm-cpu's sampler sorts the whole vocabulary of every row at every
# decode step, which costs a small model more than its forward pass. HF samples from top-p taken over
# the top-k set, so only those k logits ever need sorting. Requests that carry
# ``extra_args={HF_TOPK_TOPP: [top_k, top_p]}`` (and top_k 0 / top_p 1 for vLLM itself) are filtered
# here instead; all other requests pass through untouched. vLLM applies argmax-invariant processors
# after the temperature and before its own top-k/top-p, the same order as HF's warpers.
# --------------------------------------------------------------------------------------------------
HF_TOPK_TOPP = "hf_top_k_top_p"  # SamplingParams.extra_args key -> [top_k, top_p]


def hf_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """HF's ``TopKLogitsWarper`` then ``TopPLogitsWarper``, sorting only the top-k candidates.

    Args:
        logits: ``[R, V]`` float32, already divided by the temperature.
        top_k: ``[R]`` int, >= 1 (clamped to V). Every token tied with the k-th largest logit is kept,
            as in HF, so a row may keep more than k.
        top_p: ``[R]`` float in (0, 1]; 1 skips top-p for that row.
    Returns:
        ``[R, V]`` float32: kept logits unchanged, every other entry ``-inf`` (a new tensor). Where
        tokens with equal logits straddle the top-p cut, HF drops whichever its (unstable) sort puts
        first; here the lower token id goes first -- the same number of tokens with the same logits
        is kept, so the sampled distribution is the same up to relabelling equal-logit tokens.
    """
    k = top_k.to(logits.device, torch.long).clamp(1, logits.shape[-1])
    vals, idx = logits.topk(int(k.max()), dim=-1)
    kth = vals.gather(1, (k - 1)[:, None])  # [R, 1]
    n = int((logits >= kth).sum(-1).max())   # > max k only when logits tie with a row's k-th
    if n > vals.shape[1]:
        vals, idx = logits.topk(n, dim=-1)
    vals = vals.masked_fill(vals < kth, float("-inf"))
    # Ascending by (logit, token id), as HF's cumulative sum runs: deterministic order among ties.
    by_id = idx.argsort(dim=-1)
    vals, idx = vals.gather(1, by_id), idx.gather(1, by_id)
    order = vals.argsort(dim=-1, stable=True)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    # 1 - p rounded to float32 once, as HF's python-float comparison against float32 probabilities does.
    cut = torch.tensor([1.0 - float(p) for p in top_p.tolist()], dtype=torch.float32, device=logits.device)
    drop = vals.softmax(dim=-1).cumsum(dim=-1) <= cut[:, None]
    drop[:, -1] = False                                  # HF keeps at least one token
    drop &= (top_p < 1).to(logits.device)[:, None]       # HF adds no top-p warper for p = 1
    out = torch.full_like(logits, float("-inf"))
    return out.scatter_(1, idx, vals.masked_fill(drop, float("-inf")))


@functools.cache
def hf_sampling_processor():
    """The vLLM ``LogitsProcessor`` class applying ``hf_top_k_top_p`` per request (built on first call:
    vLLM is optional and slow to import). Pass it as ``LLM(logits_processors=[hf_sampling_processor()])``."""
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

    class HFTopKTopP(LogitsProcessor):
        @classmethod
        def validate_params(cls, params):
            a = (params.extra_args or {}).get(HF_TOPK_TOPP)
            if a is not None and not (len(a) == 2 and int(a[0]) >= 1 and 0 < float(a[1]) <= 1):
                raise ValueError(f"extra_args[{HF_TOPK_TOPP!r}] must be [top_k >= 1, 0 < top_p <= 1], got {a!r}")

        def __init__(self, vllm_config, device, is_pin_memory):
            self.args: dict[int, tuple[int, float]] = {}  # persistent-batch row -> (top_k, top_p)
            self.batch = None                              # (rows, top_k, top_p) tensors, rebuilt on change

        def is_argmax_invariant(self):
            return True  # the largest logit always survives top-k and top-p

        def update_state(self, batch_update):
            if not batch_update:
                return
            for i in batch_update.removed:  # documented order: removed, added, moved
                self.args.pop(i, None)
            for i, params, _, _ in batch_update.added:
                a = (params.extra_args or {}).get(HF_TOPK_TOPP)
                if a is None:
                    self.args.pop(i, None)
                else:
                    self.args[i] = (int(a[0]), float(a[1]))
            for i, j, how in batch_update.moved:
                ai, aj = self.args.pop(i, None), self.args.pop(j, None)
                if ai is not None:
                    self.args[j] = ai
                if aj is not None and how == MoveDirectionality.SWAP:
                    self.args[i] = aj
            self.batch = None

        def apply(self, logits):
            if not self.args:
                return logits
            if self.batch is None:
                rows = sorted(self.args)
                self.batch = (torch.tensor(rows), torch.tensor([self.args[r][0] for r in rows]),
                              torch.tensor([self.args[r][1] for r in rows], dtype=torch.float64))
            rows, k, p = self.batch
            if len(rows) == logits.shape[0] and int(rows[-1]) == len(rows) - 1:  # all rows (rollouts): in place
                return hf_top_k_top_p(logits, k, p)
            rows = rows.to(logits.device)
            logits[rows] = hf_top_k_top_p(logits[rows], k, p)
            return logits

    return HFTopKTopP
