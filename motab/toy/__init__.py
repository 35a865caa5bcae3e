"""The miniature reasoning world of ``motab demo``: a task with checkable multi-step answers
(``task.py``), its tokenizer (``tokenizer.py``) and the tiny teacher shipped with the package
(``teacher.py``, weights under ``assets/``). A leaf: it imports nothing of the pipeline; the drivers
that train and tune on it live beside the demo, in ``motab.demo``."""
