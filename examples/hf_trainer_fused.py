"""Distillation in a plain transformers.Trainer with the fused loss (no [tokens × vocab] logits).

    python examples/hf_trainer_fused.py

``DistillationTrainer`` is a Trainer whose ``compute_loss`` calls
``motab.integrations.hf.distillation_loss``; call that function from your own ``compute_loss``
instead if you already subclass Trainer.
"""

import tempfile

from _tiny import collate, completion_rows, tiny_model
from datasets import Dataset
from transformers import TrainingArguments

from motab.integrations.hf import DistillationTrainer

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
