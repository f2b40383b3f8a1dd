"""Student/teacher prompts under real template shapes, HF rollouts, the teacher pass."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout import Rollout, encode, generate_hf, student_prompt
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
