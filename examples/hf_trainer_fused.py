"""Distillation in a plain transformers.Trainer with the fused loss (no [tokens × vocab] logits).

    python examples/hf_trainer_fused.py

``DistillationTrainer`` is a Trainer whose ``compute_loss`` calls
``motab.integrations.hf.distillation_loss``; call that function from your own ``compute_loss``
instead if you already subclass Trainer.
"""

import tempfile

import torch
from _tiny import collate, completion_rows, tiny_model
from datasets import Dataset
from transformers import TrainingArguments

from motab.integrations.hf import DistillationTrainer, distillation_loss

trainer = DistillationTrainer(
    model=tiny_model(hidden=32, layers=1, seed=0),
    teacher_model=tiny_model(hidden=64, layers=2, seed=1),
    kind="fkl",  # KL(teacher ‖ student); "rkl" or "jsd" with beta= also work
    temperature=1.0,
    args=TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=4,
        max_steps=5,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
    ),
    train_dataset=Dataset.from_dict(completion_rows(20)),
    data_collator=collate,
)
result = trainer.train()
print(f"DistillationTrainer: training loss {result.training_loss:.6f}")

# The loss it trains on is KL(teacher ‖ student) over the labelled tokens, as the naive way computes
# it from both models' full logits; here it is computed without them. One batch, both ways:
columns = completion_rows(4, seed=1)
batch = collate([{name: values[i] for name, values in columns.items()} for i in range(4)])
with torch.no_grad():
    fused = distillation_loss(trainer.model, trainer.teacher_model, batch, kind="fkl").loss
    student_logp = trainer.model(input_ids=batch["input_ids"]).logits[:, :-1].log_softmax(-1)
    teacher_logp = trainer.teacher_model(input_ids=batch["input_ids"]).logits[:, :-1].log_softmax(-1)
    labelled = batch["labels"][:, 1:] != -100  # position i predicts token i + 1
    naive = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)[labelled].mean()
print(f"one batch: fused loss {fused:.6f}, naive loss {naive:.6f}")
