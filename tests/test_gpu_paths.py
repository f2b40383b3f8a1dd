"""Code paths a first GPU run takes, checked on the CPU (issue 23, faults a, c, d and the sleep flag)."""
import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch

import pwopsd.engine as R

ROOT = Path(__file__).resolve().parents[1]


def fake_vllm(monkeypatch, engine_fields: set[str]):
    """A stand-in ``vllm`` package on a CUDA machine: ``LLM`` records its kwargs, ``EngineArgs`` has
    ``engine_fields``, and the CPU logits processor's module (gone in vLLM 0.34) cannot be imported."""
    seen = {}

    class LLM:
        def __init__(self, **kw):
            seen.update(kw)
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=kw["max_model_len"]))

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.EngineArgs = dataclasses.make_dataclass("EngineArgs", [(f, object, None) for f in sorted(engine_fields)])
    for name, module in {"vllm": vllm, "vllm.engine": types.ModuleType("vllm.engine"),
                         "vllm.engine.arg_utils": arg_utils, "vllm.v1.sample.logits_processor": None}.items():
        monkeypatch.setitem(sys.modules, name, module)  # None: `import` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    R.hf_sampling_processor.cache_clear()  # built by an earlier test? then it could not be caught importing
    monkeypatch.setattr(R, "vllm_available", lambda: True)
    return seen


@pytest.fixture
def no_processor_cache():
    yield
    R.hf_sampling_processor.cache_clear()  # later tests rebuild the real one


@pytest.mark.parametrize("version", ["0.33", "0.34"])
@pytest.mark.parametrize("sleep", [False, True])
def test_cuda_engine_kwargs_without_the_cpu_processor(monkeypatch, tiny_model_dir, no_processor_cache, version, sleep):
    fields = {"gpu_memory_utilization", "enable_sleep_mode"} | ({"enable_extensible_kv_cache"} if version == "0.34" else set())
    seen = fake_vllm(monkeypatch, fields)
    acc = types.SimpleNamespace(process_index=1, num_processes=4)
    engine = R.make_engine("vllm", tiny_model_dir, dtype="float32", max_model_len=64, seed=5, colocated=True,
                           accelerator=acc, gpu_memory_utilization=0.4, sleep=sleep)
    expected = {"gpu_memory_utilization": 0.4, "distributed_executor_backend": "external_launcher",
                **({"enable_sleep_mode": True} if sleep else {}),
                **({"enable_extensible_kv_cache": False} if version == "0.34" else {})}
    assert {k: v for k, v in seen.items() if k in expected or k in ("enable_sleep_mode", "enable_extensible_kv_cache",
                                                                     "logits_processors", "enforce_eager")} == expected
    assert seen["seed"] == 6 and seen["max_model_len"] == 64
    assert engine.sleep_mode is sleep and engine.hf_top_k_top_p is False


def test_sleep_flag_reaches_the_engine_and_is_off_in_every_config():
    import yaml

    import pwopsd.run
    import train

    assert train.Args().vllm_sleep is False
    for path in (ROOT / "configs").glob("*.yaml"):
        assert yaml.safe_load(path.read_text()).get("vllm_sleep", False) is False, path.name
    assert "sleep=args.vllm_sleep" in Path(pwopsd.run.__file__).read_text()


def test_gpu_config_without_cuda_stops_in_one_line(tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--config", str(ROOT / "configs" / "qwen3-4b-pwopsd.yaml"), "--rollout_backend", "hf",
            "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    msg = str(e.value) + capsys.readouterr().err
    assert "--dtype bfloat16 asks for a GPU, but torch.cuda.is_available() is False" in msg and "--allow_cpu true" in msg
    assert len(msg.strip().splitlines()) == 1
    assert train.parse_args(argv + ["--allow_cpu", "true"]).dtype == "bfloat16"  # asked for explicitly
    assert train.parse_args(["--dataset", "demo-arithmetic", "--rollout_backend", "hf", "--output_dir",
                             str(tmp_path / "p")]).dtype == "auto"  # the CPU demo's settings are untouched


def test_rollout_throughput_labels_only_the_filters_the_engine_has():
    """Fault f: a CUDA engine has no HF top-k -> top-p processor, so no row may be labelled with it."""
    sys.path.insert(0, str(ROOT / "bench"))
    from rollout_throughput import filter_phases

    assert filter_phases(False) == [("sampled: vLLM's own top-k/top-p", True)]
    assert filter_phases(True)[0] == ("sampled: HF top-k -> top-p processor", False)
