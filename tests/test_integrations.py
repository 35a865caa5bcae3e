"""Drop-ins for TRL's GKDTrainer and a plain HF Trainer: same loss, same student gradients, no logits.

Tiny random Qwen2 models and an in-memory word-level tokenizer (nothing is downloaded). Mixed
precision is off so that the two paths can be compared at fp32 tolerance.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from motab.integrations.hf import DistillationTrainer, distillation_loss
from motab_kernels.reference import per_token_divergence
from tests.tiny import tiny_qwen2, word_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
if not os.environ.get("CI"):  # CI installs the test extra, trl included: there a missing trl fails
    pytest.importorskip("trl", reason="the TRL drop-in needs trl (pip install 'motab[trl]')")
from datasets import Dataset  # noqa: E402  (a dependency of trl)

from motab.integrations.trl import FusedGKDTrainer, GKDTrainer  # noqa: E402

try:
    from trl.experimental.gkd import GKDConfig
except ImportError:
    from trl import GKDConfig

VOCAB = 101


def tiny_model(hidden, layers, seed, vocab=VOCAB):
    return tiny_qwen2(seed, hidden=hidden, layers=layers, vocab=vocab)


def tokenizer():
    words = [f"t{i}" for i in range(VOCAB - 2)] + ["<pad>", "<eos>"]
    return word_tokenizer(words, "t0", pad_token="<pad>", eos_token="<eos>")


def batch(seed=0):
    """Two rows of 12 tokens: a 4-token prompt (label -100), row 1 right-padded after 9 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 2, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def dataset():
    b = batch()
    return Dataset.from_dict({k: v.tolist() for k, v in b.items()})


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


class GradientsBeforeStep(TrainerCallback):
    def __init__(self):
        self.grads = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(trainer):
    """Runs one real training step; returns the loss compute_loss gave and the student gradients."""
    grabber = GradientsBeforeStep()
    trainer.add_callback(grabber)
    losses = []
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: losses.append(compute_loss(*a, **k)) or losses[-1]
    trainer.train()
    assert len(losses) == 1 and grabber.grads
    return losses[0].detach(), grabber.grads


def step_arguments(cls, tmp_path, **extra):
    # lr 0 and no clipping: the step leaves the weights alone and the gradients unscaled
    return cls(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=0.0,
        max_grad_norm=0.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        **extra,
    )


def lm_head_positions(model):
    """Records how many positions each call of the model's LM head projected."""
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[-2]))
    return seen


def assert_same_gradients(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_drop_in_matches_gkd_trainer(beta, tmp_path):
    student, teacher = tiny_model(32, 1, seed=0), tiny_model(64, 2, seed=1)
    results = {}
    for cls in (GKDTrainer, FusedGKDTrainer):
        model = copy.deepcopy(student)
        heads = lm_head_positions(model)
        args = step_arguments(GKDConfig, tmp_path, lmbda=0.0, seq_kd=False, beta=beta)
        trainer = cls(
            model=model,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset(),
            data_collator=collate,
            processing_class=tokenizer(),
        )
        results[cls] = (*one_step(trainer), heads)
    (loss, grads, heads), (gkd_loss, gkd_grads, gkd_heads) = results[FusedGKDTrainer], results[GKDTrainer]
    torch.testing.assert_close(loss, gkd_loss, rtol=1e-5, atol=1e-7)
    assert_same_gradients(grads, gkd_grads)
    assert gkd_heads == [12]  # TRL projects every position onto the vocabulary ...
    assert heads == [0]  # ... the drop-in none: no [tokens × vocab] logits exist


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_hf_trainer_helper_matches_naive_loss(kind, tmp_path):
    student, teacher = tiny_model(32, 1, seed=2), tiny_model(48, 2, seed=3)
    inputs = batch(seed=1)

    # naive: full logits of both models, log-softmax, divergence, masked mean
    naive_student = copy.deepcopy(student)
    logits = naive_student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    valid = inputs["labels"][:, 1:] != -100
    per_token = per_token_divergence(logits / 0.7, teacher_logits / 0.7, kind, 0.3)
    naive_loss = per_token[valid].sum() / valid.sum()
    naive_loss.backward()

    model = copy.deepcopy(student)
    heads = lm_head_positions(model)
    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher,
        kind=kind,
        beta=0.3,
        temperature=0.7,
        args=step_arguments(TrainingArguments, tmp_path),
        train_dataset=dataset(),
        data_collator=lambda rows: inputs,
    )
    loss, grads = one_step(trainer)
    torch.testing.assert_close(loss, naive_loss.detach(), rtol=1e-5, atol=1e-7)
    assert_same_gradients(grads, {n: p.grad for n, p in naive_student.named_parameters()})
    assert heads == [0]


def test_num_items_in_batch_replaces_the_token_count():
    student, teacher = tiny_model(32, 1, seed=4), tiny_model(32, 1, seed=5)
    inputs = batch()
    mean = distillation_loss(student, teacher, inputs).loss
    valid = int((inputs["labels"][:, 1:] != -100).sum())
    scaled = distillation_loss(student, teacher, inputs, num_items_in_batch=torch.tensor(50)).loss
    torch.testing.assert_close(scaled, mean * valid / 50)


def test_vocabulary_mismatch_is_refused():
    student, teacher = tiny_model(32, 1, seed=0), tiny_model(32, 1, seed=1, vocab=VOCAB + 2)
    with pytest.raises(ValueError, match=r"vocabulary mismatch: the student's LM head has 101 rows, the teacher's 103"):
        distillation_loss(student, teacher, batch())
