"""A training run's checkpoints: written atomically, checked to fit a student, read back.

``checkpoint-<step>/`` holds the student as a plain Hugging Face folder (``student/``,
``save_pretrained``, safetensors, with the tokenizer), the scheduler, the step, the number of ranks,
the run's settings, RNG states and the optimizer:

- replicated (one process or DDP): ``trainer_state.pt`` holds all of it (rank 0's RNG);
- sharded (FSDP): the parameters' and optimizer state's shards in ``sharded/``
  (``torch.distributed.checkpoint``), each rank's RNG in ``rng-<rank>.pt``, ``trainer_state.pt``
  the rest, and ``student/`` gathered tensor by tensor into rank 0's CPU memory (one full copy there
  while it is written).

A save writes into a temporary folder that rank 0 renames into place once every rank has written
its part, then points ``latest`` at it: a save cut short leaves the previous checkpoint as it was.
Which folders are checkpoints, which one ``latest`` names and what a cut-short save leaves behind
are ``motab.runs``'s rules; the training loop that decides when to save is ``motab.trainer``'s.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from motab.config import ConfigError, TrainConfig, changed_fields

STUDENT = "student"  # the plain Hugging Face folder: what from_pretrained and ``motab eval`` load
SHARDED = "sharded"  # FSDP's shards; its presence says how the checkpoint was written
TRAINER_STATE = "trainer_state.pt"
# the settings a resume may change without a warning: where the run is and where it reports, not
# how it trains
UNCOMPARED = ("output_dir", "report_to")


class ResumeWarning(UserWarning):
    """A resumed run's setting differs from the checkpoint's."""


# --- writing -----------------------------------------------------------------------------------


def save_atomically(out: Path, step: int, write_part: Callable[[Path], None], rank: int, world: int) -> Path:
    """Writes ``out/checkpoint-<step>`` and points ``out/latest`` at it; every rank calls it, and
    ``write_part(folder)`` writes this rank's part into the temporary folder. Returns the folder."""
    final = out / f"checkpoint-{step}"
    temporary = out / f".checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    _barrier(world)
    write_part(temporary)
    _barrier(world)  # every rank's part is written
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        # the pointer too is renamed into place: a kill leaves the old ``latest`` or the new one
        pointer = out / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, out / "latest")
    _barrier(world)
    return final


def save_replicated(
    folder: Path, student: nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer, progress: dict, rng: dict
) -> None:
    """The whole student, the optimizer, ``progress`` (``progress_state``) and ``rng`` (rank 0's
    states): rank 0 alone writes a replicated run's checkpoint."""
    save_student(folder / STUDENT, student, tokenizer)
    torch.save(dict(optimizer=optimizer.state_dict(), **progress, **rng), folder / TRAINER_STATE)


def save_sharded(
    folder: Path,
    train_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    student: nn.Module,
    tokenizer: Any,
    progress: dict,
    rng: dict,
    rank: int,
) -> None:
    """This rank's shards of the parameters and optimizer state and its RNG states; rank 0 also the
    gathered student as a plain HF folder and ``progress``. Every rank calls it (collectives)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(train_model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / SHARDED)
    torch.save(rng, folder / f"rng-{rank}.pt")
    full = full_student_state(student, sharded=True)
    if rank == 0:
        save_student(folder / STUDENT, student, tokenizer, full)
        torch.save(progress, folder / TRAINER_STATE)


def save_student(
    folder: Path, student: nn.Module, tokenizer: Any, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """The student as a Hugging Face folder, from ``state_dict`` (default: its own)."""
    student.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def full_student_state(student: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The student's whole state dict. Sharded, every rank must call it: the shards are gathered
    one tensor at a time to rank 0's CPU memory (the other ranks get ``{}``)."""
    if not sharded:
        return student.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(student, options=options)


def progress_state(scheduler: Any, step: int, world: int, config: TrainConfig) -> dict:
    """What ``trainer_state.pt`` holds besides the optimizer and RNG: the scheduler, the step, the
    number of ranks (a sharded checkpoint resumes on as many) and the settings (to warn of changes)."""
    return dict(scheduler=scheduler.state_dict(), step=step, world=world, config=asdict(config))


def rng_state() -> dict:
    """This process's random number generators' states."""
    return dict(
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(),
    )


def set_rng_state(state: dict) -> None:
    """Restores the states ``rng_state`` took (the CUDA ones where this process has CUDA)."""
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])


# --- reading -----------------------------------------------------------------------------------


def check_fits(folder: Path, student: nn.Module, sharded: bool) -> None:
    """ConfigError unless the checkpoint was written as this run shards (or not) and its student
    has ``student``'s parameter names and shapes (the first that differs is named); reads only the
    safetensors headers, so nothing is loaded."""
    written_sharded = (folder / SHARDED).is_dir()
    if written_sharded != sharded:
        raise ConfigError(
            f"checkpoint {folder} was written {'with' if written_sharded else 'without'} FSDP sharding and "
            f"this run {'shards' if sharded else 'does not shard'} the student: resume with the "
            "train.parallel and the number of ranks that wrote it"
        )
    from safetensors import safe_open

    saved = {}
    for shard in sorted((folder / STUDENT).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            saved.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    # a DTensor's shape is the whole parameter's, so this holds under FSDP too
    mine = {name: tuple(t.shape) for name, t in student.state_dict().items()}
    for name, shape in saved.items():
        if name not in mine:
            raise ConfigError(f"checkpoint {folder} does not fit the student: it has {name}, the student not")
        if mine[name] != shape:
            raise ConfigError(
                f"checkpoint {folder} does not fit the student: {name} is {list(shape)} there and "
                f"{list(mine[name])} in the student"
            )
    missing = [name for name in mine if name not in saved and not _is_tied(student, name)]
    if missing:
        raise ConfigError(f"checkpoint {folder} does not fit the student: it lacks {missing[0]}")


def read_progress(folder: Path) -> dict:
    """``trainer_state.pt``: the scheduler, step, ranks and settings (and, replicated, the
    optimizer and RNG states)."""
    return torch.load(folder / TRAINER_STATE, weights_only=False)


def changed_settings(saved: dict, current: dict) -> list[str]:
    """One line per setting that differs between two ``asdict(TrainConfig)``, named as the YAML
    writes it (``train.learning_rate``, ``rollout.draft_len``, ``monitor.tau``: rollout's sections
    are sections of their own)."""
    return [
        f"{'.'.join(keys[-2:]) if len(keys) > 1 else 'train.' + keys[0]} changed from {before!r} in the "
        f"checkpoint to {now!r}"
        for keys, before, now in changed_fields(saved, current)
        if keys[0] not in UNCOMPARED
    ]


def load_replicated(
    folder: Path, student: nn.Module, optimizer: torch.optim.Optimizer, progress: dict, device: torch.device
) -> None:
    """The student's weights, the optimizer and the RNG states of a replicated checkpoint
    (``progress``: its ``read_progress``)."""
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted((folder / STUDENT).glob("*.safetensors")):
        weights.update(load_file(shard, device=str(device)))
    missing, unexpected = student.load_state_dict(weights, strict=False)
    # tied weights are stored once: anything missing must be tied to something loaded
    if unexpected or any(not _is_tied(student, name) for name in missing):
        raise RuntimeError(f"checkpoint {folder} does not fit the student: missing {missing}, unexpected {unexpected}")
    optimizer.load_state_dict(progress["optimizer"])
    set_rng_state(progress)


def load_sharded(
    folder: Path, train_model: nn.Module, optimizer: torch.optim.Optimizer, written_by: int, rank: int, world: int
) -> None:
    """This rank's shards of the parameters and optimizer state and its RNG states; ConfigError
    unless the checkpoint was ``written_by`` as many ranks as ``world`` (the shards are per rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if written_by != world:
        raise ConfigError(
            f"checkpoint {folder} was written by {written_by} ranks; resume it on {written_by}, not {world}"
        )
    model_state, optimizer_state = get_state_dict(train_model, optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / SHARDED)
    set_state_dict(train_model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    set_rng_state(torch.load(folder / f"rng-{rank}.pt", weights_only=False))


def _is_tied(student: nn.Module, name: str) -> bool:
    """Whether ``name`` is the LM head tied to the embeddings (saved once, under the embeddings)."""
    return getattr(student.config, "tie_word_embeddings", False) and name.startswith("lm_head")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
