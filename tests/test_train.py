"""train.py end to end on a tiny random model: bad input, prompt filtering, checkpoints, exact resume ."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
import evaluate
import pwopsd.engine as engines
import pwopsd.demo
import pwopsd.folders
import pwopsd.run


def run_train(*args, env=None, check=True):
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def tiny_args(model, out, **over):
    a = {"model": model, "dataset": "demo-arithmetic", "batch_size": 4, "per_device_train_batch_size": 2,
         "max_new_tokens": 12, "max_prompt_length": 512, "rollout_backend": "hf", "lora_r": 4, "lora_alpha": 8,
         "learning_rate": 1e-2, "max_grad_norm": 1.0, "save_steps": 2, "output_dir": out, "seed": 1}
    a.update(over)
    return [x for k, v in a.items() for x in (f"--{k}", v)]


def losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl"))]


def test_resume_gives_the_same_losses(tiny_model_dir, tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    run_train(*tiny_args(tiny_model_dir, full, max_steps=4))
    run_train(*tiny_args(tiny_model_dir, split, max_steps=2))
    assert sorted(os.listdir(split)) == ["checkpoint-2", "metrics.jsonl"]
    ck = os.path.join(split, "checkpoint-2")
    assert {"adapter", "trainer_state.json", "optimizer.bin"} <= set(os.listdir(ck))
    assert os.path.isfile(os.path.join(ck, "adapter", "adapter_model.safetensors"))
    assert os.path.getsize(os.path.join(ck, "model.safetensors")) < 1_000_000  # adapter only, not the base model
    with open(os.path.join(split, "metrics.jsonl"), "a") as f:  # a step logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    p = run_train(*tiny_args(tiny_model_dir, split, max_steps=4, resume_from_checkpoint="latest"))
    assert "resumed from" in p.stdout + p.stderr
    # a quiet console: our lines only (no DeepSpeed / transformers / accelerate log lines), ending with the summary
    out = p.stdout.splitlines()
    assert all(l.startswith(("[train] ", "step ")) for l in out) and len(out) == 5, p.stdout
    assert out[-1].startswith("[train] steps 3-4 done in ") and out[-1].endswith(f"{split}: checkpoint-2, checkpoint-4, metrics.jsonl")
    a, b = losses(full), losses(split)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    assert a[0] != pytest.approx(a[3])  # the model did train
    m = json.loads(open(os.path.join(full, "metrics.jsonl")).readline())
    for k in ("loss", "weight_mean", "weight_min", "weight_max", "response_length", "truncated", "boxed", "correct", "tokens_per_s"):
        assert k in m
    assert 0.25 <= m["weight_min"] <= m["weight_mean"] <= m["weight_max"] <= 1.0


@pytest.mark.parametrize("extra,message", [
    (["--method", "nope"], "--method: unknown 'nope'"),
    (["--batch_size", "6", "--per_device_train_batch_size", "4"],
     "--batch_size 6 is not divisible by --per_device_train_batch_size x processes = 4 x 1"),
    (["--dataset", "missing.jsonl"], "train.py: --dataset missing.jsonl: no such file"),
    (["--resume_from_checkpoint", "/nonexistent"], "--resume_from_checkpoint: no such folder"),
    (["--max_stesp", "2"], "train.py: unknown flag --max_stesp (did you mean --max_steps?)"),
    (["--temp", "0.7"], "unknown flag --temp"),  # no abbreviations: --temp is not --temperature
    (["--temperature", "0"], "--temperature must be > 0"),
])
def test_bad_input_fails_in_one_line(tiny_model_dir, tmp_path, extra, message):
    p = run_train(*tiny_args(tiny_model_dir, str(tmp_path / "o"), max_steps=1), *extra, check=False)
    assert p.returncode != 0 and message in p.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl")


def test_misspelt_lora_target_module_fails_in_one_line(tiny_model_dir, tmp_path):
    # checked right after the model loads (module names are not in config.json), before peft's traceback
    p = run_train(*tiny_args(tiny_model_dir, str(tmp_path / "o"), max_steps=1), "--lora_target_modules", "q_prj", "v_proj",
                  check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"train.py: --lora_target_modules: no module 'q_prj' in --model {tiny_model_dir}; its linear layers are "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    assert not os.path.exists(tmp_path / "o")


def test_config_with_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: x\nlearning_rat: 1.0\n")
    p = run_train("--config", cfg, check=False)
    assert p.returncode != 0 and f"{cfg}: unknown key(s) learning_rat" in p.stderr


def test_long_prompts_are_skipped_and_counted(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"problem": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}", "answer": str(2 * i)} for i in range(4)]
    rows.append({"problem": "long " * 600, "solution": "x", "answer": "1"})
    data.write_text("\n".join(json.dumps(r) for r in rows))
    p = run_train(*tiny_args(tiny_model_dir, str(tmp_path / "o"), max_steps=1, dataset=data, save_steps=100))
    assert "skipped 1 of 5 problems whose prompt exceeds --max_prompt_length 512" in p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------------------
# Output folders: never mix two runs; resume only with the same run-defining arguments
# ---------------------------------------------------------------------------------------------------------
def _parse(argv):
    import train

    return train.parse_args([str(a) for a in argv])


def _parse_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    message = str(e.value)
    assert message.startswith("train.py: ") and "\n" not in message
    return message


def _fake_checkpoint(out, step=2, **over):
    """A checkpoint folder as save_checkpoint writes it, made by a run with tiny_args(**over)."""
    import dataclasses

    saved = dataclasses.asdict(_parse(tiny_args("tiny", str(out.parent / "unused"), max_steps=4, **over)))
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": step, "args": {**saved, "output_dir": str(out)}}))
    return ck


@pytest.mark.parametrize("change,expected", [
    ({"batch_size": 8}, "--batch_size 4 -> 8"),
    ({"dataset": "other.jsonl"}, "--dataset demo-arithmetic -> other.jsonl"),
    ({"seed": 2}, "--seed 1 -> 2"),
    ({"method": "opsd"}, "--method pwopsd -> opsd"),
    ({"model": "other-model"}, "--model tiny -> other-model"),
    ({"lora_r": 8}, "--lora_r 4 -> 8"),
    ({"lora_target_modules": "q_proj"}, "--lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj -> q_proj"),
    ({"clip": 0.1}, "--clip 0.05 -> 0.1"),
    ({"w_min": 0.5}, "--w_min 0.25 -> 0.5"),
    ({"temperature": 1.0}, "--temperature 1.1 -> 1.0"),
    ({"max_new_tokens": 16}, "--max_new_tokens 12 -> 16"),
    ({"top_p": 1.0}, "--top_p 0.95 -> 1.0"),
    ({"rollout_temperature": 0.7}, "--rollout_temperature 1.1 -> 0.7"),
    ({"use_lora": "false"}, "--use_lora true -> false"),
    ({"learning_rate": 1e-3}, "--learning_rate 0.01 -> 0.001"),
])
def test_resume_with_other_run_defining_arguments_is_refused(tmp_path, change, expected):
    out = tmp_path / "run"
    ck = _fake_checkpoint(out)
    change = dict(change)
    model = change.pop("model", "tiny")
    for resume in ("latest", str(ck)):
        message = _parse_error(tiny_args(model, str(out), max_steps=4, resume_from_checkpoint=resume, **change))
        assert f"--resume_from_checkpoint {ck} was made with other arguments: {expected} (" in message


def test_resume_lists_every_difference_and_allows_the_listed_ones(tmp_path):
    import train

    out = tmp_path / "run"
    ck = _fake_checkpoint(out)
    message = _parse_error(tiny_args("tiny", str(out), max_steps=4, resume_from_checkpoint="latest", batch_size=8,
                                     seed=3))
    assert "--seed 1 -> 3" in message and "--batch_size 4 -> 8" in message
    # what may change: run length, cadence, logging, memory knobs
    ok = _parse(tiny_args("tiny", str(out), max_steps=10, save_steps=5, report_to="tensorboard",
                          per_device_train_batch_size=1, loss_chunk_size=64, resume_from_checkpoint="latest"))
    assert pwopsd.folders.check_run_folder(ok) == str(ck)
    assert {"max_steps", "save_steps", "report_to", "output_dir"} <= set(pwopsd.folders.MAY_CHANGE_ON_RESUME)
    assert set(pwopsd.folders.MAY_CHANGE_ON_RESUME) <= {f.name for f in __import__("dataclasses").fields(train.Args)}
    # a checkpoint saved by an older version without some argument: that argument is not compared
    state = json.loads((ck / "trainer_state.json").read_text())
    del state["args"]["w_s"]
    (ck / "trainer_state.json").write_text(json.dumps(state))
    _parse(tiny_args("tiny", str(out), max_steps=4, w_s=0.2, resume_from_checkpoint="latest"))
    # an incomplete checkpoint folder given by path
    (out / "checkpoint-9").mkdir()
    assert "no trainer_state.json" in _parse_error(tiny_args("tiny", str(out), resume_from_checkpoint=out / "checkpoint-9"))


def test_output_dir_that_cannot_be_a_folder_fails_before_anything_loads(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert _parse_error(tiny_args("tiny", str(f), max_steps=1)) == f"train.py: --output_dir {f}: is a file, not a folder"
    assert "is a file, not a folder" in _parse_error(tiny_args("tiny", str(f / "sub"), max_steps=1))
    assert _parse(tiny_args("tiny", str(tmp_path / "fresh" / "run"), max_steps=1)).output_dir  # made later, not now
    assert not (tmp_path / "fresh").exists()


def test_a_folder_holding_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    message = _parse_error(tiny_args("tiny", str(out), max_steps=1))
    assert message == (f"train.py: --output_dir {out} holds another run (metrics.jsonl): continue it with "
                       f"--resume_from_checkpoint latest, clear it with --overwrite_output_dir true, or use another --output_dir")
    _fake_checkpoint(out, 5)
    assert "(checkpoint-5, metrics.jsonl)" in _parse_error(tiny_args("tiny", str(out), max_steps=1))
    assert "contradict" in _parse_error(tiny_args("tiny", str(out), overwrite_output_dir="true",
                                                  resume_from_checkpoint="latest"))
    # a checkpoint of another folder resumed into this one would mix them too
    other = _fake_checkpoint(tmp_path / "other", 2)
    assert "is not in --output_dir" in _parse_error(tiny_args("tiny", str(out), max_steps=4, resume_from_checkpoint=other))
    (out / "notes.txt").write_text("not a run")
    (out / "metrics.jsonl").unlink()
    import shutil

    shutil.rmtree(out / "checkpoint-5")
    _parse(tiny_args("tiny", str(out), max_steps=1))  # other files are not a run


def test_overwrite_clears_the_old_run_only_after_the_inputs_load(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_train(*tiny_args(tiny_model_dir, str(out), max_steps=2))
    (out / "notes.txt").write_text("mine")
    before = (out / "metrics.jsonl").read_text()
    # a bad input after the flags parse (missing dataset): nothing is deleted
    p = run_train(*tiny_args(tiny_model_dir, str(out), max_steps=1, dataset=tmp_path / "missing.jsonl",
                             overwrite_output_dir="true"), check=False)
    assert p.returncode != 0 and "missing.jsonl: no such file" in p.stderr.strip().splitlines()[-1]
    assert (out / "metrics.jsonl").read_text() == before and (out / "checkpoint-2").is_dir()
    # the same with good inputs: the old run is gone, the new one is alone (other files kept)
    p = run_train(*tiny_args(tiny_model_dir, str(out), max_steps=1, overwrite_output_dir="true"))
    assert "deleted checkpoint-2, metrics.jsonl" in p.stdout + p.stderr
    assert sorted(os.listdir(out)) == ["checkpoint-1", "metrics.jsonl", "notes.txt"]
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [1]


def test_resume_latest_without_a_checkpoint_starts_fresh(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    p = run_train(*tiny_args(tiny_model_dir, str(empty), max_steps=1, resume_from_checkpoint="latest"))
    assert "no checkpoint in" in p.stdout + p.stderr and "starting fresh" in p.stdout + p.stderr
    assert [json.loads(l)["step"] for l in open(empty / "metrics.jsonl")] == [1]
    # killed before its first checkpoint: the logged steps are re-run, not appended to
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": -1.0}\n{"step": 2, "lo')
    run_train(*tiny_args(tiny_model_dir, str(killed), max_steps=1, save_steps=5, resume_from_checkpoint="latest"))
    rows = [json.loads(l) for l in open(killed / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] != -1.0


def test_heldout_summary_compares_first_and_last_evaluation(tmp_path):
    import train

    rows = [{"step": 0, "eval/demo-arithmetic-test/avg@1": 0.435, "eval/mean/avg@1": 0.435, "eval_s": 1.0},
            {"step": 1, "loss": 0.01},
            {"step": 5, "eval/demo-arithmetic-test/avg@1": 0.495, "eval/mean/avg@1": 0.495, "eval_s": 1.0}]
    args = train.parse_args(["--output_dir", str(tmp_path), "--eval_steps", "5", "--eval_n", "1", "--eval_temperature", "0",
                             "--eval_limit", "200", "--eval_benchmarks", "demo-arithmetic-test"])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert evaluate.heldout_summary(args) == ["held-out accuracy (demo-arithmetic-test, 200 problems, greedy): "
                                           "before 0.435 (step 0) -> after 0.495 (step 5)"]
    args.eval_n, args.eval_temperature = 4, 1.0  # sampled: the line names the metric; avg@4 was not logged
    assert evaluate.heldout_summary(args) == []
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")  # one evaluation: nothing to compare
    args.eval_n = 1
    assert evaluate.heldout_summary(args) == []


def test_vllm_sync_auto_is_the_adapter_for_a_16_bit_lora_policy(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    import train

    def model(dtype, lora=True):
        net = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
        return get_peft_model(net, LoraConfig(r=2, target_modules=["q_proj"])) if lora else net

    assert engines.sync_mode("auto", model(torch.bfloat16)) == "adapter"  # merged bf16 weights would round the update away
    assert engines.sync_mode("auto", model(torch.float32)) == "merged"
    assert engines.sync_mode("merged", model(torch.bfloat16)) == "merged"
    assert engines.sync_mode("auto", model(torch.bfloat16, lora=False)) == "merged"  # full fine-tuning: the weights
    with pytest.raises(ValueError, match="needs a LoRA"):
        engines.sync_mode("adapter", model(torch.float32, lora=False))
    with pytest.raises(SystemExit, match="--vllm_sync adapter syncs the LoRA adapter: it needs --use_lora true"):
        train.parse_args(tiny_args(tiny_model_dir, str(tmp_path / "o"), vllm_sync="adapter", use_lora="false"))


def test_prompts_that_fit_max_prompt_length_but_not_the_context_are_skipped_at_load(tiny_model_dir, tmp_path, capsys):
    """Issue 26 item 2: the tiny model's context is 2048 tokens. A prompt under --max_prompt_length 2048 that leaves
    no room for the response is skipped and counted at load (it used to crash the step that drew it); a response
    budget that fills the context is one line before the model loads."""
    import train

    data = tmp_path / "d.jsonl"
    rows = [{"problem": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}", "answer": str(2 * i)} for i in range(4)]
    rows.append({"problem": "long " * 1900, "solution": "x", "answer": "1"})  # ~1950 tokens: < 2048, > 2048 - 200
    data.write_text("\n".join(json.dumps(r) for r in rows))

    class Acc:
        print = staticmethod(print)

    args = _parse(tiny_args(tiny_model_dir, str(tmp_path / "o"), dataset=data, max_prompt_length=2048, max_new_tokens=200))
    _, kept, _ = train.build_prompts(args, Acc())
    assert len(kept) == 4
    assert ("skipped 1 of 5 problems whose prompt exceeds --max_prompt_length 2048 (here 1848: the model's context of "
            "2048 tokens less 200 for the response)") in capsys.readouterr().out
    for flags, message in ([("max_new_tokens", 2048)], "--max_new_tokens 2048 leaves no room"), \
                          ([("eval_steps", 1), ("eval_max_new_tokens", 4000)], "--eval_max_new_tokens 4000 leaves no room"):
        args = _parse(tiny_args(tiny_model_dir, str(tmp_path / "o"), dataset=data, **dict(flags)))
        with pytest.raises(SystemExit, match=f"^train.py: {message} for a prompt in the model's context of 2048 tokens "
                                             r"\(max_position_embeddings of --model .*\): lower it$"):
            train.build_prompts(args, Acc())


def _damaged_pair(out):
    """checkpoint-1 (sound) and checkpoint-2 whose model.safetensors a copy cut short, as files accelerate writes."""
    import torch
    from safetensors.torch import save_file

    for step in (1, 2):
        ck = _fake_checkpoint(out, step=step)
        save_file({"w": torch.arange(64, dtype=torch.float32)}, str(ck / "model.safetensors"))
        torch.save({"state": {}}, ck / "optimizer.bin")
    whole = (out / "checkpoint-2" / "model.safetensors").read_bytes()
    (out / "checkpoint-2" / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    return out / "checkpoint-1", out / "checkpoint-2"


def test_a_damaged_checkpoint_is_one_line_and_latest_skips_it(tmp_path):
    """Issue 26 item 3: half-written model.safetensors, empty or cut optimizer.bin."""
    import train

    out = tmp_path / "o"
    good, bad = _damaged_pair(out)
    argv = tiny_args("tiny", str(out), max_steps=4)
    message = _parse_error(argv + ["--resume_from_checkpoint", str(bad)])
    assert message == (f"train.py: --resume_from_checkpoint {bad}: model.safetensors is cut short (164 of 328 bytes); "
                       f"resume from another checkpoint (--resume_from_checkpoint latest takes the newest loadable one)")
    args = _parse(argv + ["--resume_from_checkpoint", "latest"])  # passes: checkpoint-1's arguments are checked
    said = []
    assert pwopsd.folders.loadable_checkpoint(str(out), said.append) == str(good)
    assert said == [f"[train] --resume_from_checkpoint latest: skipping {bad}: model.safetensors is cut short (164 of 328 bytes)"]
    (good / "optimizer.bin").write_bytes(b"")
    assert pwopsd.folders.damaged_file(good) == "optimizer.bin is empty"
    with pytest.raises(SystemExit, match=r"every checkpoint in .* is damaged \(the newest, .*checkpoint-2: model.safetensors "
                                         r"is cut short .*\); start over with --overwrite_output_dir true$"):
        pwopsd.folders.loadable_checkpoint(str(out))
    import torch

    torch.save({"state": {"x": torch.zeros(1000)}}, good / "optimizer.bin")
    cut = (good / "optimizer.bin").read_bytes()
    (good / "optimizer.bin").write_bytes(cut[:-200])  # a torch archive whose end (its directory) is missing
    assert pwopsd.folders.damaged_file(good).startswith("optimizer.bin is unreadable (")
    assert args.resume_from_checkpoint == "latest"


def test_ctrl_c_is_one_line_naming_the_checkpoint_and_the_command(tmp_path, monkeypatch, capsys):
    """Issue 26 item 4: KeyboardInterrupt (Ctrl-C) during the run -> one line on stderr, exit status 130."""
    import train

    out = tmp_path / "o"
    ck = _fake_checkpoint(out, step=2)
    argv = [str(a) for a in tiny_args("tiny", str(out), max_steps=4)] + ["--resume_from_checkpoint", "latest"]

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "setup", ctrl_c)
    with pytest.raises(SystemExit) as e:
        train.cli(argv)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train.py: interrupted; the last checkpoint is {ck}; continue with: python train.py "
                   + " ".join(argv[:-2]) + " --resume_from_checkpoint latest"]
    # a fresh run stopped before its first checkpoint: the same command with --resume_from_checkpoint latest
    pwopsd.run.INTERRUPTED.clear()
    argv = [str(a) for a in tiny_args("tiny", str(tmp_path / "p"), max_steps=4)]
    with pytest.raises(SystemExit):
        train.cli(argv + ["--overwrite_output_dir", "true"])
    assert capsys.readouterr().err.strip().splitlines() == [
        f"train.py: interrupted; no checkpoint was saved yet in {tmp_path / 'p'} (one every --save_steps 2); "
        "the same command starts afresh: python train.py " + " ".join(argv) + " --resume_from_checkpoint latest"]


def test_first_demo_run_checks_inputs_before_building_the_warm_start(tmp_path, monkeypatch):
    """Issue 26 item 5: a bad --eval_benchmarks file fails before the (minutes-long) warm-start build."""
    import train

    monkeypatch.setattr(pwopsd.demo, "build_warm_start", lambda name: pytest.fail("the warm start was built first"))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"problem": "What is 2+3?", "solution": "5"}) + "\n")  # no answer column
    args = _parse(tiny_args("smollm2-135m-warm", str(tmp_path / "o"), max_steps=1, eval_steps=1, eval_benchmarks=bench))
    with pytest.raises(SystemExit, match=r"^train.py: --eval_benchmarks .*bench.jsonl: .*no usable records: none of the 1 "
                                         r"has an answer"):
        train.setup(args)


def test_stale_build_folders_of_dead_processes_are_removed(tmp_path, capsys):
    """Issue 26 item 5: an interrupted build's <name>.tmp<pid> folder goes once its process is gone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f"smollm2-135m-warm-1234abcd.tmp{dead_pid}" / "run").mkdir(parents=True)
    (tmp_path / f"smollm2-135m-warm-1234abcd.tmp{os.getpid()}").mkdir()  # a build in progress (this process)
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()                        # a finished model
    assert pwopsd.demo.remove_stale_builds(tmp_path) == [f"smollm2-135m-warm-1234abcd.tmp{dead_pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct", f"smollm2-135m-warm-1234abcd.tmp{os.getpid()}"]
    assert "the unfinished build of a process that is gone" in capsys.readouterr().out


def test_final_line_reports_the_warm_start_build_apart(tmp_path):
    """Issue 26 item 5: `steps 1-5 done in ...` counts the steps, the build is named apart."""
    import train

    args = _parse(tiny_args("smollm2-135m-warm", str(tmp_path / "o"), max_steps=5))
    line = pwopsd.folders.run_summary(args, 0, 95.0, 312.0)
    assert line.startswith("[train] steps 1-5 done in 1 min 35 s (+ 5 min 12 s building the warm start --model "
                           "smollm2-135m-warm once); ")
    assert pwopsd.folders.run_summary(args, 0, 95.0).startswith("[train] steps 1-5 done in 1 min 35 s; ")


def test_an_unknown_lr_scheduler_is_one_line_before_anything_loads():
    """A misspelt --lr_scheduler_type failed only after the model had loaded (transformers' ValueError traceback)."""
    import train

    with pytest.raises(SystemExit) as e:
        train.parse_args(["--lr_scheduler_type", "cosin"])
    err = str(e.value.code).splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: --lr_scheduler_type: unknown 'cosin' (choose from linear, cosine")
    assert train.parse_args(["--lr_scheduler_type", "linear"]).lr_scheduler_type == "linear"
