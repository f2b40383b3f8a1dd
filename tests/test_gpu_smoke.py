"""bench/gpu_smoke.sh's CPU-sized variant runs in the suite, so the GPU smoke script cannot rot (issue 23).
~45 s of CPU time (seven Python start-ups, a few tiny models); longer wall time on a loaded machine."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_cpu_variant(tmp_path):
    env = {**os.environ, "SMOKE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--cpu"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    log = (tmp_path / "gpu_smoke.log").read_text()
    for line in ("[smoke] versions: python", "[smoke] loss chunked vs reference: loss rel. diff",
                 "[smoke] packed vs padded (float32, sdpa", "[smoke] train.py: steps [1, 2, 3]",
                 "| **step** |", "[smoke] vLLM part skipped (--cpu)", "[smoke] all parts passed"):
        assert line in log, line  # everything printed is in the log too
    assert "FAILED" not in log
    assert (tmp_path / "train_step.json").is_file() and (tmp_path / "run-hf" / "checkpoint-3").is_dir()


def test_gpu_smoke_reports_a_failed_part(tmp_path):
    """A failing part is named on the last line and counted in the exit status; the other parts still run."""
    env = {**os.environ, "SMOKE_DIR": str(tmp_path), "PYTHON": "false"}  # every Python part fails at once
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--cpu", "--no-vllm"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    last = p.stdout.strip().splitlines()[-1]
    assert p.returncode == 6 and "6 part(s) FAILED" in last and "versions" in last and "bench/train_step.py" in last
