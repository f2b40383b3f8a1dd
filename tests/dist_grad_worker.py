"""Run under `accelerate launch`: one optimizer step's gradients on *fixed* completions, saved by rank 0.

    accelerate launch --cpu --num_processes 2 tests/dist_grad_worker.py OUT.pt -- <train.py flags>

Used by tests/test_distributed.py to show that the gradient does not depend on how the step's sequences
are split over processes and micro-batches.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from rollout import Rollout  # noqa: E402

# Uneven completion lengths (token ids well inside the vocabulary); sequence i belongs to prompt i of step 0.
COMPLETIONS = [[101, 102, 103, 104, 105, 2], [201, 202], [301, 302, 303, 304, 305, 306, 307, 308, 2], [401, 402, 403, 2]]


def main():
    out, flags = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    run = train.setup(train.parse_args(flags))
    batch, offset = train.step_batch(run, step=0)  # this process's prompts and their index in the step
    rollouts = [Rollout(b["student_ids"], COMPLETIONS[offset + i], truncated=False) for i, b in enumerate(batch)]
    result = {"processes": run.accelerator.num_processes}
    for reduction in ("token", "sequence"):
        run.reduction = reduction
        run.optimizer.zero_grad()
        stats = train.accumulate_gradients(run, batch, rollouts, step=0)
        grads = {n: p.grad.detach().clone() for n, p in run.accelerator.unwrap_model(run.model).named_parameters()
                 if p.requires_grad}
        result[reduction] = {"loss": stats["loss"], "grads": grads}
    if run.accelerator.is_main_process:
        torch.save(result, out)
    run.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
