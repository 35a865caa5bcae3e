"""TRL's GKD trainer, then the same run with the fused loss: one line changes (the class).

    python examples/gkd_trl_fused.py

Tiny random models so it runs anywhere in seconds; with real ones, pass your models, tokenizer and
dataset as you would to GKDTrainer. The printed training losses agree (mixed precision is off here
so that they can be compared to the last digits).
"""

import os
import tempfile

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _tiny import collate, completion_rows, tiny_model, word_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from motab.integrations.trl import FusedGKDTrainer  # noqa: E402

teacher = tiny_model(hidden=64, layers=2, seed=1)
for trainer_class in (GKDTrainer, FusedGKDTrainer):  # ← the one-line switch
    args = GKDConfig(
        output_dir=tempfile.mkdtemp(),
        lmbda=0.5,
        beta=0.5,
        max_new_tokens=8,
        per_device_train_batch_size=4,
        max_steps=3,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    trainer = trainer_class(
        model=tiny_model(hidden=32, layers=1, seed=0),
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict(completion_rows(12)),
        data_collator=collate,
        processing_class=word_tokenizer(),
    )
    result = trainer.train()
    print(f"{trainer_class.__name__}: training loss {result.training_loss:.6f}")
