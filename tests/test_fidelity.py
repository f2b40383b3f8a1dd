"""The paper configs against docs/fidelity.md: every "same" row's `key: value` holds in each config, and the
authors' prompts (SaFo-Lab/PW-OPSD code/data_collator.py) render character for character (issue 23)."""
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["qwen3-4b-pwopsd", "qwen3-4b-opsd", "dsr1-llama-8b-pwopsd", "olmo3-7b-think-pwopsd"]
# The authors' messages for one problem, written out by hand from the collator (reason_first off).
PROBLEM, SOLUTION = "What is $2+3$?", "We add: $2+3=5$. The answer is \\boxed{5}."
STUDENT_MESSAGE = "Problem: What is $2+3$?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
TEACHER_MESSAGE = (
    "Problem: What is $2+3$?\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
    "We add: $2+3=5$. The answer is \\boxed{5}.\n=== Reference Solution End ===\n\n\nAfter reading the reference "
    "solution above, make sure you truly understand the reasoning behind each step \u2014 do not copy or paraphrase "
    "it. Now, using your own words and independent reasoning, derive the same final answer to the problem above. "
    "Think step by step, explore different approaches, and don't be afraid to backtrack or reconsider if something "
    "doesn't work out:\n\nPlease reason step by step, and put your final answer within \\boxed{}.")


def parsed(name, tmp_path):
    """train.parse_args of a config as a CPU test can parse it (no vLLM needed, no GPU)."""
    import train

    return train.parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--rollout_backend", "hf",
                             "--allow_cpu", "true", "--output_dir", str(tmp_path / name)])


def same_rows():
    """``[(config or None = every paper config, key, expected value)]`` of the rows fidelity.md marks "same"."""
    rows = []
    for line in (ROOT / "docs" / "fidelity.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or "same" not in cells:
            continue
        per_model = cells[0] in PAPER
        ours, status = (cells[3], cells[4]) if per_model else (cells[2], cells[3])
        if status != "same":
            continue
        for item in re.findall(r"`([a-z_]+): ([^`]+)`", ours):
            rows.append((cells[0] if per_model else None, item[0], yaml.safe_load(item[1])))
    return rows


def test_fidelity_table_has_the_rows_the_issue_lists():
    keys = {k for _, k, _ in same_rows()}
    assert {"lr_scheduler_type", "warmup_steps", "max_prompt_length", "max_new_tokens", "vllm_sleep", "batch_size",
            "per_device_train_batch_size", "rollout_temperature", "top_p", "top_k", "lora_r", "lora_alpha", "clip",
            "beta", "w_min", "w_tau", "w_s", "learning_rate", "max_grad_norm", "temperature"} <= keys


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_matches_every_same_row(name, tmp_path):
    args, raw = parsed(name, tmp_path), yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    checked = 0
    for config, key, expected in same_rows():
        if config not in (None, name) or (key == "method" and config is None and name.endswith("-opsd")):
            continue
        got = raw[key] if key == "rollout_backend" else getattr(args, key)  # (parsed with --rollout_backend hf)
        assert got == expected, f"configs/{name}.yaml: {key} is {got!r}; docs/fidelity.md says {expected!r}"
        checked += 1
    assert checked >= 30
    assert args.max_prompt_length + args.max_new_tokens == 20000  # the official --max_length
    assert args.batch_size == 32 and args.batch_size % (4 * args.per_device_train_batch_size) == 0  # 4 GPUs


@pytest.mark.parametrize("name", PAPER + ["qwen3-4b-opsd-official"])
def test_paper_configs_render_the_authors_prompts(name, tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    from rollout import fill_template, render_chat, student_prompt as student_prompt_from
    from teacher import render_problems, teacher_prompt

    args = parsed(name, tmp_path)
    assert fill_template(args.teacher_template, PROBLEM, SOLUTION) == TEACHER_MESSAGE
    assert fill_template(args.student_template, PROBLEM) == STUDENT_MESSAGE
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    t = teacher_prompt(tok, PROBLEM, SOLUTION, True, args.teacher_template)
    s = student_prompt_from(tok, PROBLEM, False, args.student_template)
    assert t == render_chat(tok, TEACHER_MESSAGE, True) and TEACHER_MESSAGE in t
    assert s == render_chat(tok, STUDENT_MESSAGE, False) and STUDENT_MESSAGE in s
    (kept,), _ = render_problems(tok, [{"problem": PROBLEM, "solution": SOLUTION, "answer": "5"}], 4096,
                                 student_template=args.student_template, teacher_template=args.teacher_template)
    assert tok.decode(kept["teacher_ids"]) == t and tok.decode(kept["student_ids"]) == s


def test_templates_fill_verbatim_and_bad_ones_fail_in_one_line(tmp_path, capsys):
    import train
    from rollout import fill_template

    # verbatim: no stripping, a trailing boxed instruction kept (the official collator removes nothing), one pass
    assert fill_template("P: {problem} S: {solution} \\boxed{}", " x {solution} ", "y") == "P:  x {solution}  S: y \\boxed{}"
    for flag, value, msg in (("--teacher_template", "Problem: {problem}", "--teacher_template needs both {problem} and {solution}"),
                             ("--student_template", "Problem:", "--student_template has no {problem}")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--dataset", "demo-arithmetic", "--model", "smollm2-135m", "--rollout_backend", "hf",
                              "--output_dir", str(tmp_path / "o"), flag, value])
        assert msg in str(e.value) + capsys.readouterr().err


def test_opsd_official_config_is_the_opsd_repository_run(tmp_path):
    a = parsed("qwen3-4b-opsd-official", tmp_path)
    assert (a.method, a.learning_rate, a.beta, a.clip, a.temperature) == ("opsd", 2e-4, 0.5, 0, 1.1)
    assert (a.batch_size, a.per_device_train_batch_size, a.gpu_memory_utilization) == (32, 1, 0.6)
    assert a.max_prompt_length + a.max_new_tokens == 20000 and not a.vllm_sleep
    text = (ROOT / "configs" / "qwen3-4b-opsd.yaml").read_text()
    assert "as the PW-OPSD paper ran it" in text and "qwen3-4b-opsd-official.yaml" in text


def test_linear_schedule_reaches_the_official_rate_at_checkpoint_100():
    """Linear decay to 0 at step 150, no warm-up: 5e-6 x 50/150 at step 100 (the checkpoint the paper evaluates)."""
    import torch
    from transformers import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-6)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=150)
    for _ in range(100):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(5e-6 * 50 / 150)
