"""Student/teacher prompts under real template shapes, HF rollouts, the teacher pass."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pwopsd.engine as engines
from pwopsd.engine import generate_hf
from rollout import encode, student_prompt
from teacher import completion_hidden_states, lm_head_weight, teacher_mode, teacher_prompt

# Shapes of the real templates: Qwen3 reads enable_thinking; DeepSeek-R1-Distill opens <think> itself.
QWEN3_LIKE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n"
              "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
DSR1_LIKE = ("{% for m in messages %}<｜User｜>{{ m.content }}{% endfor %}"
             "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


@pytest.fixture()
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_student_prompt_qwen3_like(tok):
    tok.chat_template = QWEN3_LIKE
    off = student_prompt(tok, "What is 2+3?", enable_thinking=False)
    on = student_prompt(tok, "What is 2+3?", enable_thinking=True)
    body = "Problem: What is 2+3?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert off == f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on == f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


def test_student_prompt_dsr1_like_closes_open_think(tok):
    tok.chat_template = DSR1_LIKE
    assert student_prompt(tok, "Q", enable_thinking=False).endswith("<｜Assistant｜><think>\n</think>\n\n")
    assert student_prompt(tok, "Q", enable_thinking=True).endswith("<｜Assistant｜><think>\n")


def test_teacher_prompt_contains_reference_and_instruction(tok):
    tok.chat_template = QWEN3_LIKE
    p = teacher_prompt(tok, "What is 2+3?", "2+3=5, so \\boxed{5}.", enable_thinking=True)
    assert "Problem: What is 2+3?\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n" \
           "2+3=5, so \\boxed{5}.\n=== Reference Solution End ===\n" in p
    assert "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>" in p
    assert p.endswith("<|im_start|>assistant\n")  # teacher thinking on: no closed think block


class _FakeGen(torch.nn.Module):
    """generate() returns fixed rows, to check EOS handling when pad == eos."""
    def __init__(self, rows):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.rows = rows

    def generate(self, input_ids, **kw):
        return torch.cat([input_ids, torch.tensor(self.rows)], 1)


def test_rollout_keeps_final_eos_when_pad_is_eos(tok):
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos  # SmolLM2: the case that breaks attention-mask-based loss masks
    fake = _FakeGen([[11, 12, eos, eos, eos], [21, 22, 23, 24, 25]])
    out = generate_hf(fake, tok, [[1, 2, 3], [4]], max_new_tokens=5, eos_ids=[eos])
    assert out[0].completion_ids == [11, 12, eos] and not out[0].truncated
    assert out[1].completion_ids == [21, 22, 23, 24, 25] and out[1].truncated
    assert out[0].prompt_ids == [1, 2, 3]


def test_generate_hf_is_seeded_and_stops_at_eos(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [encode(tok, student_prompt(tok, "1+1?")), encode(tok, student_prompt(tok, "What is 12 times 3?"))]
    a = generate_hf(model, tok, prompts, max_new_tokens=12, seed=5)
    b = generate_hf(model, tok, prompts, max_new_tokens=12, seed=5)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    for r in a:
        assert 1 <= len(r.completion_ids) <= 12
        assert r.truncated == (tok.eos_token_id not in r.completion_ids)


def test_teacher_hidden_states_equal_separate_forwards(tiny_model_dir):
    """Row k of the packed teacher pass == the last position of a forward over [prompt + completion[:k]]."""
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    prompts = [encode(tok, teacher_prompt(tok, "1+1?", "1+1=2")), encode(tok, teacher_prompt(tok, "Name a prime.", "2 is prime"))]
    comps = [[100, 200, 300, tok.eos_token_id], [400, 500]]
    with teacher_mode(model) as teacher:
        h = completion_hidden_states(teacher, prompts, comps, tok.pad_token_id)
        W = lm_head_weight(teacher)
        assert h.shape == (6, 64) and not h.requires_grad
        row = 0
        for p, c in zip(prompts, comps):
            for k in range(len(c)):
                ref = teacher(input_ids=torch.tensor([p + c[:k]])).logits[0, -1]
                torch.testing.assert_close(h[row] @ W.T, ref, rtol=1e-4, atol=1e-4)
                row += 1
    # the adapter (random, non-zero) is back on outside teacher_mode: the student differs from the teacher
    hs = completion_hidden_states(model, prompts, comps, tok.pad_token_id)
    assert hs.requires_grad and not torch.allclose(hs, h, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# One prompt rule for every stage: the instruction exactly once
# ---------------------------------------------------------------------------------------------------------
from rollout import INSTRUCTION, problem_message  # noqa: E402

_Q = "What is 2+3?"
INSTRUCTION_VARIANTS = [
    _Q,                                                       # none
    f"{_Q}\n\n{INSTRUCTION}",                                 # ours, as the AIME / MATH copies carry it
    f"{_Q} {INSTRUCTION}",                                    # same line
    f"{_Q}\n\n{INSTRUCTION}  \n\n",                           # trailing whitespace
    f"{_Q}\n\n{INSTRUCTION[:-1]}",                            # no final period
    f"{_Q}\n\n{INSTRUCTION[:-1]}!",                           # other punctuation
    f"{_Q}\n\n{INSTRUCTION.lower()}",                         # other case
    f"{_Q}\n{INSTRUCTION}\n{INSTRUCTION}",                    # twice
    f"{_Q} Please reason step by step, and put your final answer within $\\boxed{{}}$.",  # in math mode
    f"{_Q} Let's think step by step and output the final answer within \\boxed{{}}.",      # DeepScaleR / verl
    f"{_Q} Please reason step by step and put the final answer in \\boxed{{}}.",
]


@pytest.mark.parametrize("problem", INSTRUCTION_VARIANTS)
def test_every_stage_states_the_instruction_once(tok, problem):
    import evaluate as E
    from teacher import TEACHER_CONTEXT, render_problems

    assert problem_message(problem) == f"Problem: {_Q}\n\n{INSTRUCTION}"
    assert problem_message(problem, "CTX\n") == f"Problem: {_Q}\n\nCTX\n{INSTRUCTION}"
    solution = "2+3=5, so \\boxed{5}."
    stages = {"student": student_prompt(tok, problem), "evaluation": E.eval_prompt(tok, problem, False),
              "teacher": teacher_prompt(tok, problem, solution)}
    for stage, text in stages.items():
        assert text.count("reason step by step") == 1 and text.count("\\boxed{}") == 1, stage
        assert f"Problem: {_Q}\n\n" in text, stage
    assert stages["evaluation"] == stages["student"]  # evaluated on the message it was trained on
    assert TEACHER_CONTEXT.format(solution=solution) + INSTRUCTION in stages["teacher"]
    # what train.py and diagnose.py feed the model: the encoded prompts of render_problems
    (kept,), _ = render_problems(tok, [{"problem": problem, "solution": solution, "answer": "5"}], 4096)
    for key in ("student_ids", "teacher_ids"):
        assert tok.decode(kept[key]).count(INSTRUCTION) == 1, key


def test_instruction_inside_a_problem_is_left_alone():
    p = f"Someone wrote '{INSTRUCTION}' on the board. How many words is that?"
    assert problem_message(p) == f"Problem: {p}\n\n{INSTRUCTION}"
    assert problem_message("Why is \\boxed{} used?") == f"Problem: Why is \\boxed{{}} used?\n\n{INSTRUCTION}"


# ---------------------------------------------------------------------------------------------------------
# Rollouts sample only what they are told: the checkpoint's generation_config.json does not reach sampling
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def opinionated_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model again, with a generation config of the kind instruct checkpoints ship."""
    import shutil

    from transformers import GenerationConfig

    path = tmp_path_factory.mktemp("tiny-genconfig")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    base = GenerationConfig.from_pretrained(tiny_model_dir)
    GenerationConfig(**{**base.to_diff_dict(), "repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "typical_p": 0.5,
                        "top_k": 5, "min_new_tokens": 3, "do_sample": True}).save_pretrained(path)
    return str(path)


def test_hf_rollouts_ignore_the_checkpoints_generation_config(tiny_model_dir, opinionated_model_dir):
    import rollout as R

    plain = engines.make_engine("hf", tiny_model_dir, dtype="float32")
    loud = engines.make_engine("hf", opinionated_model_dir, dtype="float32")
    assert loud.model.generation_config.repetition_penalty == 1.5  # the file was read
    tok = plain.tokenizer
    prompts = [encode(tok, student_prompt(tok, "What is 12 times 3?")), encode(tok, student_prompt(tok, "1+1?"))]

    def ids(engine, **kw):
        groups = R.generate(engine, prompts, n=2, seeds=7, max_new_tokens=10, **kw)
        return [r.completion_ids for g in groups for r in g]

    for kw in ({"top_k": 0, "top_p": 1.0, "temperature": 1.0}, {"top_k": 20, "top_p": 0.95, "temperature": 1.1},
               {"temperature": 0.0}):
        assert ids(loud, **kw) == ids(plain, **kw), kw
    assert loud.model.generation_config.repetition_penalty == 1.5  # restored after the call
    # the test can fail: transformers left to itself does apply the file
    x = torch.tensor([prompts[0]])
    torch.manual_seed(0)
    a = loud.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, temperature=1.0, top_p=1.0)
    torch.manual_seed(0)
    b = plain.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, temperature=1.0, top_p=1.0,
                             do_sample=True)
    assert a.tolist() != b.tolist()
    # top_k 0 means off (all of the vocabulary), not transformers' unset default of 50
    assert ids(plain, top_k=0, top_p=1.0, temperature=1.0) != ids(plain, top_k=50, top_p=1.0, temperature=1.0)


def test_the_training_policy_ignores_it_too(tiny_model_dir, opinionated_model_dir):
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [encode(tok, student_prompt(tok, "What is 7 + 8?"))]
    out = []
    for path in (tiny_model_dir, opinionated_model_dir):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=2, target_modules=["q_proj"]))
        out.append([r.completion_ids for r in generate_hf(model, tok, prompts, max_new_tokens=10, temperature=1.1,
                                                          top_p=0.95, top_k=0, seed=3)])
    assert out[0] == out[1]


def test_vllm_engine_is_told_to_ignore_the_generation_config(monkeypatch, tiny_model_dir):
    """vLLM's LLM(generation_config="vllm"): neutral defaults, no caps from the file (EOS ids still read)."""
    import types

    import rollout as R

    vllm = pytest.importorskip("vllm")
    seen = {}

    class FakeLLM:
        def __init__(self, **kw):
            seen.update(kw)
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=64))

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    engine = engines.make_engine("vllm", tiny_model_dir, dtype="float32", max_model_len=64)
    assert seen["generation_config"] == "vllm" and seen["model"] == tiny_model_dir
    assert engine.stop_ids == [AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id]
