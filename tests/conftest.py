"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer, saved to disk once per session."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"  # small real-format files (never ../shared: users' clones lack it)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir():
    from data import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """2-layer, 64-wide Llama (random, seeded) + SmolLM2 tokenizer, float32, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def peaked_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with larger random weights: peaked next-token distributions, so the teacher/student
    KL is O(1) and float32 rounding (~1e-7 relative) cannot hide a normalisation error of the split."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# The fast tier: `python -m pytest tests -q -m "not slow"` (<= 2 min on 2 cores) covers the loss, weights,
# reductions, prompts, grading and one training loop on a tiny model; the full suite stays the README's command.
# "slow" is decided here, by file and by test function, from one measured run (`--durations`): anything that
# starts a vLLM engine, several processes or a multi-step training subprocess, or took >= ~4 s on a loaded
# machine. A test not listed is fast; every parametrisation of a listed function is slow.
# ---------------------------------------------------------------------------------------------------------
SLOW_FILES = {
    "test_distributed.py",  # 2-process gloo / DeepSpeed launches
    "test_vllm.py",  # vLLM engines and multi-step syncs
    "test_train_step.py",  # one full step timed per phase
    "test_teacher_eval.py",  # EMA and evaluation-during-training runs (subprocesses)
}
SLOW_TESTS = {
    "test_train.py": {"test_resume_gives_the_same_losses", "test_overwrite_clears_the_old_run_only_after_the_inputs_load",
                      "test_resume_latest_without_a_checkpoint_starts_fresh", "test_long_prompts_are_skipped_and_counted",
                      "test_bad_input_fails_in_one_line", "test_config_with_unknown_key"},
    "test_study.py": {"test_mini_repro_quick_runs_and_reports", "test_train_routes_clip_mode_total",
                      "test_train_sft_step1_loss_is_the_reference_cross_entropy",
                      "test_bad_clip_mode_and_sft_prompts_fail_in_one_line"},
    "test_evaluate.py": {"test_vllm_backend_runs_and_resumes", "test_resume_after_a_kill_gives_the_same_summary",
                         "test_an_unreachable_hub_benchmark_is_one_line",
                         "test_the_bar_counts_token_budget_as_calls_finish_and_ends_at_the_total",
                         "test_evaluating_an_adapter_writes_no_model_files_vllm",
                         "test_lora_checkpoint_in_16_bit_merges_in_float32_or_is_served_unmerged"},
    "test_diagnose.py": {"test_vllm_backend_budgets_and_per_request_seeds", "test_end_to_end_resume_and_outputs",
                         "test_forcing_reaches_every_hf_continuation_row", "test_plots_keep_legend_and_counts_off_the_data",
                         "test_overwrite_clears_the_old_run_only_after_the_inputs_load"},
    "test_rollout_teacher.py": {"test_hf_rollouts_ignore_the_checkpoints_generation_config",
                                "test_the_training_policy_ignores_it_too", "test_vllm_engine_is_told_to_ignore_the_generation_config"},
    "test_trainer_features.py": {"test_two_generations_equal_duplicated_prompts"},
    "test_hf_top_k_top_p.py": {"test_engine_samples_only_from_hf_kept_set"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file, name = item.path.name, getattr(item, "originalname", item.name)
        if file in SLOW_FILES or name in SLOW_TESTS.get(file, ()):
            item.add_marker(pytest.mark.slow)
