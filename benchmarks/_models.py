"""Random models for the benchmarks, built from configs (nothing is downloaded): Qwen2.5-shaped
on a GPU, tiny on a CPU."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

QWEN_VOCAB = 151936
QWEN2_5_1_5B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
QWEN2_5_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
TINY_STUDENT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
TINY_TEACHER = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def random_lm(shape: dict, vocab: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """A randomly initialised Qwen2 causal LM of ``shape`` in eval mode, built where it runs:
    initialising a 7B-shaped model on a GPU takes seconds, on the host's CPU minutes."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, max_position_embeddings=32768, **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def student_and_teacher(device: torch.device, cpu_vocab: int):
    """(student, teacher, vocab, dtype): 1.5B- and 7B-shaped in bf16 on a GPU, tiny fp32 ones on a CPU."""
    if device.type == "cuda":
        dtype, vocab, shapes = torch.bfloat16, QWEN_VOCAB, (QWEN2_5_1_5B, QWEN2_5_7B)
    else:
        dtype, vocab, shapes = torch.float32, cpu_vocab, (TINY_STUDENT, TINY_TEACHER)
    student = random_lm(shapes[0], vocab, dtype, device, seed=0)
    teacher = random_lm(shapes[1], vocab, dtype, device, seed=1)
    return student, teacher, vocab, dtype
