"""Distillation from a plain ``transformers.Trainer`` without building ``[tokens × vocab]`` logits.

Both models run their usual forward (through any wrapper, so DDP/accelerate keep working) with
``logits_to_keep`` set to no position: the LM head projects nothing, a forward hook on the
decoder captures its final hidden states, and the fused op computes the divergence from those
and the LM-head weights.

    class MyTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = distillation_loss(model, self.teacher, inputs, kind="fkl", num_items_in_batch=num_items_in_batch)
            return (out.loss, out) if return_outputs else out.loss

or use ``DistillationTrainer(teacher_model=..., kind=..., ...)`` below.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from motab.models import final_hidden_states, lm_head, shared_vocab
from motab_kernels import DivergenceOutput, fused_linear_divergence


def distillation_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    inputs: dict[str, Any],
    *,
    kind: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    vocab_size: int | None = None,
) -> DivergenceOutput:
    """The divergence between teacher and student on ``inputs`` (``input_ids``, ``labels`` and
    optional ``attention_mask``), position i scoring the prediction of ``labels[i + 1]``.

    The loss is summed over tokens whose label is not ``ignore_index`` and divided by their
    number, or by ``num_items_in_batch`` when given (the Trainer passes the count over all
    gradient-accumulation micro-batches). The teacher runs in eval mode without gradient.
    ``vocab_size`` (the tokenizer's length) cuts both LM heads, and their biases, to the shared
    ids: needed when the heads are padded differently (the trainers pass it from their tokenizer).
    """
    input_ids, labels = inputs["input_ids"], inputs["labels"]
    attention_mask = inputs.get("attention_mask")
    vocab = shared_vocab(student, teacher, vocab_size=vocab_size)
    student_hidden = final_hidden_states(student, input_ids, attention_mask)
    teacher.eval()
    with torch.no_grad():
        teacher_hidden = final_hidden_states(teacher, input_ids, attention_mask)
    (student_weight, student_bias), (teacher_weight, teacher_bias) = (lm_head(m, vocab) for m in (student, teacher))
    options = dict(kind=kind, beta=beta, temperature=temperature, ignore_index=ignore_index, impl=impl)
    biases = dict(student_bias=student_bias, teacher_bias=teacher_bias)
    # position i predicts labels[i + 1]: the last position has nothing to predict
    student_hidden, teacher_hidden, target = student_hidden[:, :-1], teacher_hidden[:, :-1], labels[:, 1:]
    return fused_linear_divergence(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        target=target,
        normalizer=num_items_in_batch,
        **biases,
        **options,
    )


def tokenizer_size(trainer) -> int | None:
    """The vocabulary of a Trainer's tokenizer (``processing_class``), if it has one: the ids the
    two LM heads share."""
    tokenizer = getattr(trainer, "processing_class", None)
    return len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "get_vocab") else None


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is the fused divergence to ``teacher_model``.

    ``kind``/``beta``/``temperature`` as in ``fused_linear_divergence``; everything else is the
    Trainer's. ``return_outputs`` yields the ``DivergenceOutput`` (no logits exist).
    """

    def __init__(
        self,
        *args,
        teacher_model: torch.nn.Module,
        kind: str = "fkl",
        beta: float = 0.5,
        temperature: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.to(self.args.device)
        self.distillation = dict(kind=kind, beta=beta, temperature=temperature, vocab_size=tokenizer_size(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = distillation_loss(
            model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch, **self.distillation
        )
        return (out.loss, out) if return_outputs else out.loss
