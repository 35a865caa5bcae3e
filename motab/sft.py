"""Supervised fine-tuning (SFT) of the student on synthesised reasoning traces, with TRL's ``SFTTrainer``.

The synthesis step writes one record per trace with at least ``prompt`` and ``completion`` (TRL's
prompt-completion form); every other field (``input``, ``output``, scores, ...) is dropped before
training. The loss covers the completion tokens only: TRL tokenises ``prompt + completion`` (the two
strings concatenated as they are, so any separator must be part of one of them), appends the
tokenizer's EOS to the completion, and sets the labels of the prompt tokens to -100 while preparing
the data set (``completion_only_loss=True``).

Packing (on by default, as in the reference scripts) uses TRL's best-fit-decreasing packer, which
turns on padding-free batches: the packed documents go to the model as one row with ``position_ids``
restarting at 0 for each document and no ``attention_mask``. Since TRL 0.24 the collator always sends
those ``position_ids``, and transformers (4.54 and later) derives a block-diagonal causal mask from
them for ``eager``, ``sdpa`` and ``flex_attention``, while the FlashAttention kernels read the
sequence boundaries (``cu_seq_lens``) directly: documents never attend to one another, on CPU as on
GPU, and each document's positions start at 0. The completion mask survives packing because the
labels are built before packing and packed with the ids; the collator also masks the first token of
each document, so no document learns to predict the next one's start. A packed document longer than
``max_length`` is cut at ``max_length`` (TRL's ``"bfd"`` strategy drops the overflow); without
packing, TRL truncates at ``max_length`` and drops examples left with no completion token.

Checkpoints are the HF Trainer's own (``output_dir/checkpoint-<step>``, with optimizer, scheduler
and RNG states); ``resume=True`` continues from the latest. The final model and tokenizer are saved
into ``output_dir`` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from motab.config import SFTOptions
from motab.models import load_tokenizer
from motab.runs import without_hf_bars

logger = logging.getLogger(__name__)

#: The only columns training sees; the rest of a synthesised record is metadata.
COLUMNS = ("prompt", "completion")


@dataclass
class SFTResult:
    """What a run did: its trainer (model, state, log history), where it saved, and whence it resumed."""

    trainer: SFTTrainer
    output_dir: Path
    global_step: int
    training_loss: float
    resumed_from: Path | None


def read_records(records: str | Path | list[dict]) -> list[tuple[str, dict]]:
    """The records with where each came from (``file:line`` for JSONL, ``record i`` otherwise), so that
    errors can point at the offending line. Other formats go through ``motab.data.load_records``."""
    if isinstance(records, list):
        return [(f"record {i}", record) for i, record in enumerate(records)]
    path = Path(records)
    if not path.exists():
        raise FileNotFoundError(f"SFT records {path} do not exist")
    if path.is_file() and path.suffix == ".jsonl":
        located = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        located.append((f"{path}:{number}", json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number} is not valid JSON ({error.msg})") from error
        return located
    from motab.data import load_records

    return [(f"{path} record {i}", record) for i, record in enumerate(load_records(path))]


def to_dataset(records: str | Path | list[dict]) -> Dataset:
    """A ``prompt``/``completion`` data set: the other fields are dropped (TRL would otherwise take a
    ``text`` or ``messages`` field for another data format), and a record without both strings is refused."""
    located = read_records(records)
    if not located:
        raise ValueError(f"no SFT records in {records if not isinstance(records, list) else 'the given list'}")
    rows = []
    for where, record in located:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [name for name in COLUMNS if name not in record]
        if missing:
            raise ValueError(f"{where} lacks {missing} (it has {sorted(record)}); SFT needs 'prompt' and 'completion'")
        wrong = [name for name in COLUMNS if not isinstance(record[name], str)]
        if wrong:
            raise ValueError(f"{where}: {wrong} must be strings, got {[type(record[n]).__name__ for n in wrong]}")
        rows.append({name: record[name] for name in COLUMNS})
    return Dataset.from_list(rows)


def _config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(SFTConfig)}


def sft_config(options: SFTOptions, output_dir: str | Path, *, model_from_path: bool = False) -> SFTConfig:
    """The TRL configuration of a run. Field names follow the installed transformers: recent 5.x
    releases (5.24 here) take the warm-up ratio as a float ``warmup_steps`` in [0, 1) (``warmup_ratio``
    is gone) and rename ``gradient_checkpointing`` to ``activation_checkpointing``; 4.x has the old names."""
    fields = _config_fields()
    if "warmup_ratio" in fields:
        warmup = {"warmup_ratio": options.warmup_ratio}
    else:
        warmup = {"warmup_steps": float(options.warmup_ratio)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return SFTConfig(
        output_dir=str(output_dir),
        learning_rate=options.learning_rate,
        num_train_epochs=options.num_train_epochs,
        max_steps=-1 if options.max_steps is None else options.max_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": options.min_lr},
        **warmup,
        weight_decay=options.weight_decay,
        adam_beta2=options.adam_beta2,
        packing=options.packing,
        packing_strategy="bfd",
        max_length=options.max_length,
        completion_only_loss=True,
        per_device_train_batch_size=options.per_device_train_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        bf16=options.use_bf16(),
        fp16=False,
        **{checkpointing: options.gradient_checkpointing},
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        logging_steps=options.logging_steps,
        report_to=options.report_to,
        disable_tqdm=not options.progress,
        dataloader_pin_memory=torch.cuda.is_available(),
        # a model given as a path is read from disk, never fetched from a hub
        model_init_kwargs={"local_files_only": True} if model_from_path else None,
    )


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The Trainer checkpoints (``checkpoint-<step>`` folders) in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resume_point(output_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run; refuses a fresh run over checkpoints
    (it would mix two runs' checkpoints and the later rotation would delete the old run's) and a
    resume with nothing to resume."""
    existing = checkpoints(output_dir)
    if resume:
        last = get_last_checkpoint(str(output_dir)) if existing else None
        if last is None:
            raise ValueError(
                f"resume=True but {output_dir} holds no checkpoint ({PREFIX_CHECKPOINT_DIR}-<step>) to resume from; "
                "run without resume to start afresh"
            )
        return Path(last)
    if existing:
        raise ValueError(
            f"{output_dir} already holds checkpoints ({', '.join(p.name for p in existing)}): pass resume=True to "
            "continue that run, or choose another output_dir"
        )
    return None


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Checks the EOS that ends every completion (so the student learns to stop) and, when the tokenizer
    has no pad token, pads with EOS as TRL does; the labels mask padding by position, not by id, so the
    EOS closing a completion still gets its loss."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: SFT ends every completion with it, so set one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _resolve_model(
    model: str | Path | torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[str | torch.nn.Module, PreTrainedTokenizerBase]:
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("pass the tokenizer along with a model object (it is read from disk only for a path)")
        return model, tokenizer
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model {path} is not a directory: run_sft loads models from disk only")
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    return str(path), tokenizer


def build_trainer(
    model: str | Path | torch.nn.Module,
    records: str | Path | list[dict],
    output_dir: str | Path,
    options: SFTOptions | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> SFTTrainer:
    """The ``SFTTrainer`` of a run, data prepared, not yet trained (``run_sft`` trains it; tests read
    its batches)."""
    options = SFTOptions() if options is None else options
    dataset = to_dataset(records)  # bad records are refused before any model is loaded
    model, tokenizer = _resolve_model(model, tokenizer)
    config = sft_config(options, output_dir, model_from_path=isinstance(model, str))
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=prepare_tokenizer(tokenizer))


def run_sft(
    model: str | Path | torch.nn.Module,
    records: str | Path | list[dict],
    output_dir: str | Path,
    options: SFTOptions | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    resume: bool = False,
) -> SFTResult:
    """Fine-tunes ``model`` (a model object with its ``tokenizer``, or a local model directory) on the
    prompt/completion ``records`` (a JSONL/Parquet file, a saved data set, or a list of dicts) and
    saves the final model and tokenizer into ``output_dir``. ``resume=True`` continues from the latest
    checkpoint in ``output_dir`` (weights, optimizer, scheduler, RNG and data position); pass the
    same model, records and options as the interrupted run."""
    options = SFTOptions() if options is None else options
    output_dir = Path(output_dir)
    start = resume_point(output_dir, resume)  # checked before any model is loaded
    if not options.progress:
        import datasets

        datasets.disable_progress_bars()
    trainer = build_trainer(model, records, output_dir, options, tokenizer=tokenizer)
    if not options.progress:  # without its bar the Trainer prints every log dict instead
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if start is not None:
        logger.info("resuming SFT from %s", start)
    # without progress, transformers' own bars (writing the model's shards) are off too
    with without_hf_bars() if not options.progress else contextlib.nullcontext():
        output = trainer.train(resume_from_checkpoint=True if start is not None else None)
        trainer.save_model(str(output_dir))  # the model and the processing class (tokenizer)
    trainer.save_state()
    return SFTResult(trainer, output_dir, output.global_step, output.training_loss, start)
