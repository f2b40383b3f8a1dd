"""The console: quiet library logs by default, and the token-budget progress bar every stage shows."""
from __future__ import annotations

import logging
import os
import sys
import warnings

# The console. By default a run prints its own lines (header, progress bars, step lines, final summary) and the
# libraries only their errors: vLLM's start-up log (INFO and WARNING lines on stdout: engine config, Triton, LD_PRELOAD
# tips, thread binding), transformers' / datasets' / DeepSpeed's / accelerate's warnings, transformers' weight-loading
# bars and FutureWarnings / DeprecationWarnings are dropped. `--verbose true` keeps all of it; a VLLM_LOGGING_LEVEL
# the user set is never overridden. Hub download bars stay: they are progress.
LIBRARY_LOGGERS = ("vllm", "transformers", "datasets", "huggingface_hub", "accelerate", "peft", "DeepSpeed", "torch")

# vLLM's in-place weight reload (engine.sync_weights, every optimizer step) ends with a WARNING
# "<Layer>: Failed to load weights" for each layer that owns tensors the streamed checkpoint did not contain, and then
# puts that layer's tensors back as they were. For these two layers that is right, so the line is a false alarm:
#   * RotaryEmbedding -- its only tensor is the cos/sin cache, computed from the config at start-up; no checkpoint
#     holds it and training never changes it;
#   * ParallelLMHead of a model with tied embeddings (SmolLM2, Qwen3-4B) -- its weight is the embedding matrix itself
#     (one tensor, which engine.policy_weights yields once, as embed_tokens, and the reload does update).
# An untied head is streamed by name (lm_head.weight) and never warns. tests/test_vllm.py checks that synced engines
# sample what HF samples. Dropped always (also with --verbose); any other layer's line still shows.
HARMLESS_RELOAD_WARNINGS = ("RotaryEmbedding: Failed to load weights", "ParallelLMHead: Failed to load weights")

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"  # the module that logs them


def _not_a_harmless_reload_warning(record: logging.LogRecord) -> bool:
    return record.getMessage() not in HARMLESS_RELOAD_WARNINGS


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_logs(verbose: bool = False):
    """Set up the console for a run (call once, after the flags parsed, before models load); see the note above.

    Quiet (``verbose=False``): the loggers in ``LIBRARY_LOGGERS`` pass only ERROR and above (levels set now, and for
    libraries imported later through their verbosity variables and a filter that survives their own set-up;
    vLLM's level is ``VLLM_LOGGING_LEVEL`` if the user set it, else ERROR: also for the lines vLLM logs while it
    imports, before its own logging set-up, e.g. "Triton is installed, but ..."); transformers' progress bars off;
    FutureWarning and DeprecationWarning ignored. The harmless reload warnings are dropped either way.
    Idempotent; changes this process (and its children, through the environment) only.
    """
    logging.getLogger(RELOAD_LOGGER).addFilter(_not_a_harmless_reload_warning)  # a logger filter: exactly its records
    if verbose:
        return
    user_vllm_level = os.environ.get("VLLM_LOGGING_LEVEL")
    for var, value in (("VLLM_LOGGING_LEVEL", "ERROR"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("DATASETS_VERBOSITY", "error"), ("HF_HUB_VERBOSITY", "error")):
        os.environ.setdefault(var, value)  # read when vLLM / transformers / datasets / the Hub client configure logging
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if name == "vllm" and user_vllm_level:  # the user's level, also for what vLLM logs before it configures itself
            if isinstance(logging.getLevelName(user_vllm_level.upper()), int):
                logger.setLevel(user_vllm_level.upper())
            continue
        logger.setLevel(logging.ERROR)       # their child loggers inherit it ...
        logger.addFilter(_errors_only)       # ... and DeepSpeed, which resets its level on import, keeps this filter
    import transformers

    # Every bar transformers draws (loading / writing shards) is noise at this size; Hub downloads use their own bars.
    transformers.utils.logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def budget_bar(total: int, desc: str, *, initial: int = 0, leave: bool = True, disable: bool = False):
    """The progress bar every stage shows while it samples: a tqdm over ``total`` tokens of budget (``n x
    max_new_tokens`` per prompt; ``generate(progress=)`` advances it as tokens come, a sample that stops early adds
    the rest of its budget), so its time left is an upper bound. smoothing 0: the rate is the average so far."""
    import tqdm  # looked up at call time (tests record the bar by patching tqdm.tqdm)

    return tqdm.tqdm(total=total, initial=initial, desc=f"{desc} (token budget)", unit="tok", unit_scale=True, leave=leave,
                smoothing=0, disable=disable, dynamic_ncols=True)


def continue_command(prog: str, argv: list[str] | None, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> str:
    """``python <prog> <argv>`` (``sys.argv[1:]`` when ``argv`` is None) without the flags in ``drop`` (each with its
    value), plus ``add``; shell-quoted: the command that continues a run."""
    import shlex

    rest, kept = [str(a) for a in (sys.argv[1:] if argv is None else argv)], []
    while rest:
        a = rest.pop(0)
        if a.split("=")[0] in drop:
            if "=" not in a and rest:
                rest.pop(0)
            continue
        kept.append(a)
    return shlex.join(["python", prog, *kept, *add])


def exit_on_interrupt(main, prog: str, saved) -> None:
    """Run ``main()``; on Ctrl-C (KeyboardInterrupt) print one line instead of a traceback --
    ``<prog>: interrupted; <saved()>`` (what is on disk and the command that continues) -- and exit with 130.
    Under a multi-process launch only rank 0 prints."""
    try:
        main()
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            try:
                what = saved()
            except Exception as e:  # the line must come out even if looking at the output folder fails
                what = f"(could not read what was saved: {type(e).__name__})"
            print(f"{prog}: interrupted; {what}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def interruptible(main, prog: str, saved):
    """A script's command line, ``cli(argv=None)``: ``main(argv)`` with a one-line Ctrl-C (``exit_on_interrupt``);
    ``saved(argv)`` says what is on disk and the command that continues. ``main`` itself still raises
    KeyboardInterrupt (for callers that import it)."""
    return lambda argv=None: exit_on_interrupt(lambda: main(argv), prog, lambda: saved(argv))
