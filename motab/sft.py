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
into ``output_dir`` itself, with ``sft.run.json`` (what produced them: motab's version, the command,
the model, the records and the options). A folder that holds checkpoints or a saved model is refused
unless ``resume`` or ``overwrite`` (which removes those, ``SFT_FILES``, and nothing else).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from motab.config import SFTOptions
from motab.models import load_tokenizer
from motab.runs import API_FLAGS, without_hf_bars, write_run_record

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


# What a run writes into its folder besides its checkpoints (the final model and tokenizer, the
# Trainer's state and logs, our record): what ``overwrite`` removes, and nothing else.
SFT_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json",
    "vocab.json", "merges.txt", "training_args.bin", "trainer_state.json", "sft.run.json", "runs",
)  # fmt: skip


def resume_point(
    output_dir: str | Path, resume: bool, overwrite: bool = False, flags: tuple[str, str] = API_FLAGS
) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run; refuses a fresh run over
    checkpoints or a saved model (it would mix two runs, and the later rotation would delete the
    old run's checkpoints) unless ``overwrite``, both at once, and a resume with nothing to resume.
    Reads only; ``clear_sft_run`` removes what ``overwrite`` replaces. ``flags`` name resume and
    overwrite as the caller spells them."""
    output_dir = Path(output_dir)
    existing = checkpoints(output_dir)
    if resume and overwrite:
        raise ValueError(f"{flags[0]} and {flags[1]} exclude each other: continue the run or start it again")
    if resume:
        last = get_last_checkpoint(str(output_dir)) if existing else None
        if last is None:
            raise ValueError(
                f"{flags[0]} but {output_dir} holds no checkpoint ({PREFIX_CHECKPOINT_DIR}-<step>) to resume from; "
                f"start afresh without it (or with {flags[1]})"
            )
        return Path(last)
    if overwrite:
        return None
    if existing:
        raise ValueError(
            f"{output_dir} already holds checkpoints ({', '.join(p.name for p in existing)}): pass {flags[0]} to "
            f"continue that run or {flags[1]} to start again, or choose another output_dir"
        )
    if (output_dir / "config.json").exists():
        raise ValueError(
            f"{output_dir} already holds a saved model: pass {flags[1]} to replace it, or choose another output_dir"
        )
    return None


def clear_sft_run(output_dir: Path) -> None:
    """Removes a run's checkpoints and ``SFT_FILES`` from ``output_dir``; nothing else."""
    for folder in checkpoints(output_dir):
        shutil.rmtree(folder)
    for path in (output_dir / name for name in SFT_FILES):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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
    use_cpu: bool = False,
) -> SFTTrainer:
    """The ``SFTTrainer`` of a run, data prepared, not yet trained (``run_sft`` trains it; tests read
    its batches); ``use_cpu`` keeps it off a GPU (and out of bf16)."""
    options = SFTOptions() if options is None else options
    if use_cpu:
        options = dataclasses.replace(options, bf16=False)
    dataset = to_dataset(records)  # bad records are refused before any model is loaded
    model, tokenizer = _resolve_model(model, tokenizer)
    config = sft_config(options, output_dir, model_from_path=isinstance(model, str))
    config.use_cpu = use_cpu
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=prepare_tokenizer(tokenizer))


def run_sft(
    model: str | Path | torch.nn.Module,
    records: str | Path | list[dict],
    output_dir: str | Path,
    options: SFTOptions | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    flags: tuple[str, str] = API_FLAGS,
) -> SFTResult:
    """Fine-tunes ``model`` (a model object with its ``tokenizer``, or a local model directory) on the
    prompt/completion ``records`` (a JSONL/Parquet file, a saved data set, or a list of dicts) and
    saves the final model and tokenizer into ``output_dir``. ``resume=True`` continues from the latest
    checkpoint in ``output_dir`` (weights, optimizer, scheduler, RNG and data position); pass the
    same model, records and options as the interrupted run. ``overwrite=True`` starts again in a
    used folder. ``device="cpu"`` trains on the CPU even where a GPU is (None: the Trainer's choice)."""
    options = SFTOptions() if options is None else options
    output_dir = Path(output_dir)
    start = resume_point(output_dir, resume, overwrite, flags)  # checked before any model is loaded
    if overwrite:
        clear_sft_run(output_dir)
    if not options.progress:
        import datasets

        datasets.disable_progress_bars()
    trainer = build_trainer(model, records, output_dir, options, tokenizer=tokenizer, use_cpu=device == "cpu")
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
    write_run_record(
        output_dir / "sft.run.json",
        model=str(model) if isinstance(model, (str, Path)) else None,
        records=str(records) if isinstance(records, (str, Path)) else f"{len(records)} records given in Python",
        options=dataclasses.asdict(options),
    )
    return SFTResult(trainer, output_dir, output.global_step, output.training_loss, start)
