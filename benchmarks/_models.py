"""Random models for the benchmarks, from the package's factory (``motab.tiny``; nothing is
downloaded): Qwen2.5-shaped on a GPU, tiny on a CPU. Shapes are ``tiny_config``'s arguments."""

from __future__ import annotations

import torch

from motab.tiny import tiny_model

QWEN_VOCAB = 151936
QWEN2_5_1_5B = dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, tie=True)
QWEN2_5_7B = dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, tie=False)
TINY_STUDENT = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
TINY_TEACHER = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2)


def random_lm(shape: dict, vocab: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """A randomly initialised Qwen2 causal LM of ``shape`` in eval mode, built where it runs:
    initialising a 7B-shaped model on a GPU takes seconds, on the host's CPU minutes."""
    model = tiny_model(
        seed, **shape, vocab=vocab, max_positions=32768, attn_implementation="sdpa", dtype=dtype, device=device
    )
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
