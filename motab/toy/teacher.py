"""The toy task's shipped teacher: where it lies in the package and how to load it (with its
tokenizer), never from a hub."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def teacher_path() -> Path:
    return Path(str(resources.files("motab.toy") / "assets" / "teacher"))


def load_teacher(device: str = "cpu"):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = teacher_path()
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the toy teacher is missing from {path}: reinstall motab or run python -m motab.demo.train_teacher"
        )
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
