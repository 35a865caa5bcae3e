"""The miniature reasoning world of ``motab demo``: a task with checkable multi-step answers, its
tokenizer, and (once trained) a tiny teacher shipped with the package."""
