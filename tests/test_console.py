"""The console (pwopsd.console.quiet_logs): library chatter dropped by default, errors kept, --verbose keeps all, the harmless
vLLM reload warnings always dropped; the user's VLLM_LOGGING_LEVEL wins. (The line counts of real runs are checked
where those runs already happen: tests/test_evaluate.py's vLLM run, tests/test_train.py's resume run.)"""
import logging
import os
import warnings

import pytest

from pwopsd import console

NAMES = console.LIBRARY_LOGGERS + (console.RELOAD_LOGGER, "vllm.v1.worker.cpu_worker", "transformers.modeling_utils")
VARS = ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY")


@pytest.fixture
def seen(monkeypatch):
    """The messages that reach a handler on each library's root logger; every logger, variable and the transformers
    bar hook restored afterwards (quiet_logs changes the whole process)."""
    import transformers

    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in NAMES}
    for n in NAMES:  # a clean start: libraries at WARNING, nothing of an earlier quiet_logs (other tests run mains)
        logging.getLogger(n).setLevel(logging.WARNING if n in console.LIBRARY_LOGGERS else logging.NOTSET)
        logging.getLogger(n).filters.clear()
    got = []
    handler = logging.Handler()
    handler.emit = lambda record: got.append(record.getMessage())
    for name in console.LIBRARY_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    yield got
    for name, (level, filters) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).filters[:] = filters
        logging.getLogger(name).removeHandler(handler)
    transformers.utils.logging.set_tqdm_hook(None)


def _chatter():
    """What a demo run's libraries say: vLLM start-up lines, a transformers warning, DeepSpeed's accelerator line
    (logged after DeepSpeed reset its own level on import, as it does), the reload warnings, and two real errors."""
    logging.getLogger("vllm.v1.worker.cpu_worker").warning("libtcmalloc is not found in LD_PRELOAD.")
    logging.getLogger("vllm.v1.engine.core").info("Initializing a V1 LLM engine (v0.32.0) with config: ...")
    logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU.")
    for layer in ("RotaryEmbedding", "ParallelLMHead", "QKVParallelLinear"):
        logging.getLogger(console.RELOAD_LOGGER).warning("%s: Failed to load weights", layer)
    logging.getLogger("vllm.v1.engine.core").error("EngineCore failed")
    logging.getLogger("DeepSpeed").error("a DeepSpeed error")


def test_quiet_by_default_keeps_only_errors(seen):
    console.quiet_logs(False)
    _chatter()
    assert seen == ["EngineCore failed", "a DeepSpeed error"]
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`torch.distributed.reduce_op` is deprecated", FutureWarning)
        warnings.warn("a user warning stays", UserWarning)
    assert [str(w.message) for w in caught] == ["a user warning stays"]
    from transformers.utils.logging import tqdm

    assert tqdm(range(3), desc="Loading weights").disable  # transformers' bars are off


def test_verbose_keeps_everything_but_the_harmless_reload_warnings(seen):
    logging.getLogger("vllm").setLevel(logging.INFO)  # as vLLM configures itself when VLLM_LOGGING_LEVEL is unset
    console.quiet_logs(True)
    _chatter()
    assert seen == ["libtcmalloc is not found in LD_PRELOAD.", "Initializing a V1 LLM engine (v0.32.0) with config: ...",
                    "Some weights were not initialized", "Setting accelerator to CPU.",
                    "QKVParallelLinear: Failed to load weights", "EngineCore failed", "a DeepSpeed error"]


def test_a_vllm_logging_level_set_by_the_user_wins(seen, monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")  # set by the user (or inherited): vLLM's import lines follow it
    console.quiet_logs(False)
    logging.getLogger("vllm.triton_utils.importing").warning("Triton is installed, but doesn't include CPU backend.")
    assert seen == [] and logging.getLogger("vllm").level == logging.ERROR
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    console.quiet_logs(False)
    _chatter()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO" and logging.getLogger("vllm").level == logging.INFO
    assert seen == ["libtcmalloc is not found in LD_PRELOAD.", "Initializing a V1 LLM engine (v0.32.0) with config: ...",
                    "QKVParallelLinear: Failed to load weights", "EngineCore failed", "a DeepSpeed error"]
