"""``motab demo``: MOTAB and its baselines distilling a small student from the shipped toy teacher,
on a CPU, in minutes (see ``run.py``), and the drivers behind what the demo ships:

- ``run.py``: the demo itself (warm start, the five methods at one budget, the report).
- ``measures.py``: teacher decay and teacher guidance on the warm-started student.
- ``toy_models.py``: the toy models, their supervised training and greedy accuracy.
- ``tune.py``: ``python -m motab.demo.tune``, the equal-budget tuning behind the shipped record.
- ``train_teacher.py``: ``python -m motab.demo.train_teacher``, the shipped teacher's training.

The task, its tokenizer and the shipped teacher are ``motab.toy`` (a leaf: it imports nothing of
the pipeline). Importing this package registers the toy task's answer format, ``toy`` (the ``#d``
of a completion, graded as the demo grades it), with ``motab.evaluate``: ``motab eval
--answer-format toy`` and ``evaluate(..., answer_format="toy")`` read it from there.
"""

from motab.demo.measures import teacher_decay, teacher_guidance
from motab.demo.run import (
    FULL,
    METHODS,
    QUICK,
    SHARED_OPTIONS,
    TUNING_GRID,
    DemoSize,
    distil,
    format_table,
    method_config,
    run_demo,
    tuned_options,
    tuning_record_path,
    warm_student,
)
from motab.evaluate import AnswerFormat, register_answer_format
from motab.toy.task import extract_answer as toy_answer

TOY_ANSWER_FORMAT = register_answer_format(AnswerFormat("toy", toy_answer, description="the toy task's #d"))

__all__ = [
    "FULL",
    "METHODS",
    "QUICK",
    "SHARED_OPTIONS",
    "TOY_ANSWER_FORMAT",
    "TUNING_GRID",
    "DemoSize",
    "distil",
    "format_table",
    "method_config",
    "run_demo",
    "teacher_decay",
    "teacher_guidance",
    "tuned_options",
    "tuning_record_path",
    "warm_student",
]
