"""On-policy distillation training: rollout → forward of both models → fused loss → optimizer step.

Each step draws ``prompts_per_step`` problems (a fixed function of the seed and the step), rolls
them out with the current student (eval mode, no gradient) under ``rollout`` (MOTAB or a
baseline), then trains on prompt + trajectory in micro-batches of ``micro_batch`` prompts:

- the student's final hidden states come from its ordinary forward with no logits computed
  (``motab.models.final_hidden_states``); the teacher's are the ones the rollout kept
  (``TrainConfig.reuse_teacher_hidden``), else one frozen, eval-mode, no-grad teacher forward;
- the loss is ``motab.losses.TrajectoryDistillationLoss``, normalised by the number of loss
  positions over the *whole step*, so accumulating micro-batches gives the gradient of one big
  batch;
- then gradient clipping, AdamW, warm-up + cosine schedule.

Several ranks: ``torchrun --nproc-per-node N -m motab.cli train --config run.yaml`` (or
``accelerate launch -m motab.cli train ...``; the CLI joins the process group). Each rank rolls out
and trains on its share of the step's prompts and the loss is normalised by the loss tokens over
all ranks, so N ranks compute the same step as one. ``TrainConfig.parallel`` says how the student is
spread over them (with one process it changes nothing):

- ``"ddp"`` (default): every rank holds the whole student and optimizer; DDP averages gradients.
- ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the student's parameters,
  gradients and AdamW state over the ranks. Each decoder layer is a group of its own, gathered for
  its forward and again for its backward. The root group is ``StudentLoss``, the module that holds
  the student, so its embeddings, final norm and LM head, tied or not (tied parameters must share
  a group): the root's pre-forward hook gathers them and FSDP keeps a root gathered from its forward
  to its backward. The fused loss reads the LM-head weight outside the head's own forward, so it
  runs inside that root forward: it gets the whole head, and the head's gradient reaches the
  gathered parameter and is reduce-scattered with the root group's after backward. Micro-batches
  but the last run with gradient sync off (``set_requires_gradient_sync``): until the last, each
  rank keeps unsharded gradients of the whole student. A rollout calls the student's decoder
  directly, a different number of times on each rank, so no collective may run inside it:
  ``StudentLoss.with_full_weights`` gathers every group once before and frees the layers after. For
  the rollout's duration a rank holds the whole student's parameters (one copy, in their dtype) on
  top of its shards.

The teacher is replicated on every rank either way.

Every ``save_every`` steps (and on Ctrl-C or SIGTERM) a checkpoint is written atomically: a temporary
folder, renamed into place once every rank has written its part, then ``latest`` pointed at it;
SIGINT and SIGTERM wait until that is done. ``save_total_limit`` keeps the newest N checkpoints
(never the one ``latest`` names); rank 0 redraws ``loss.png`` at each save. What a checkpoint
holds (the student as a plain Hugging Face folder, the optimizer, scheduler, step and RNG states;
under FSDP the shards) and how it is written and read back is ``motab.checkpoint``'s. The output
folder must be one that every rank sees. A folder that holds a run (``motab.runs``) is refused
unless ``resume`` or ``overwrite`` (which removes the run's own files first); the temporaries of a
save cut short are removed at the start. ``resume=True`` continues from the latest checkpoint to
the same parameters an uninterrupted run reaches (bit for bit on CPU), with the same ``parallel``
and number of ranks; it refuses a checkpoint of another student shape (ConfigError), warns of each
setting changed (``ResumeWarning``) and cuts ``metrics.jsonl`` back to the checkpoint's step.
Metrics go to ``metrics.jsonl``, one line a step (``lr``: the rate that step used), and from rank 0
to the experiment trackers ``report_to`` names (``Trackers``: transformers' reporting callbacks).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from motab.checkpoint import (
    ResumeWarning,
    changed_settings,
    check_fits,
    full_student_state,
    load_replicated,
    load_sharded,
    progress_state,
    read_progress,
    rng_state,
    save_atomically,
    save_replicated,
    save_sharded,
)
from motab.config import ConfigError, TrainConfig
from motab.data import Problem
from motab.engine import paged_for_rollouts, pool_tokens, rollout
from motab.losses import NO_LOSS, TrajectoryDistillationLoss, trajectory_targets
from motab.models import final_hidden_states, lm_head, shared_vocab
from motab.policy import policy_of
from motab.runs import (
    check_run_folder,
    checkpoints_to_delete,
    clear_run,
    cut_metrics,
    latest_checkpoint,
    metrics_line,
    remove_temporaries,
    sigterm_as_interrupt,
)

Result = TypeVar("Result")


class StudentLoss(nn.Module):
    """The student's forward and the fused loss as one module: the module DDP or FSDP wraps.

    Under FSDP it is the root, whose own group holds the student's embeddings, final norm and LM
    head: its pre-forward hook gathers them, the loss reads the gathered head inside this forward,
    and the head's gradient goes through the root group's reduce-scatter after backward.
    """

    def __init__(self, student: nn.Module, loss_fn: TrajectoryDistillationLoss, vocab: int) -> None:
        super().__init__()
        self.student, self.loss_fn, self.vocab = student, loss_fn, vocab

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        loss_positions: torch.Tensor,
        targets: torch.Tensor,
        codes: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_head: torch.Tensor,
        teacher_bias: torch.Tensor | None,
        normalizer: int,
    ) -> torch.Tensor:
        """The loss of a micro-batch (``targets`` and ``codes`` at the loss positions only)."""
        hidden = final_hidden_states(self.student, ids, mask)
        head, bias = lm_head(self.student, self.vocab)
        out = self.loss_fn(
            hidden[loss_positions],
            head,
            teacher_hidden,
            teacher_head,
            targets,
            codes,
            normalizer=normalizer,
            student_bias=bias,
            teacher_bias=teacher_bias,
        )
        return out.loss

    def with_full_weights(self, run: Callable[[], Result]) -> Result:
        """``run()`` (a rollout: the student's decoder and head called outside this forward) with
        every parameter of the student whole on this rank; every rank must call it.

        Under FSDP, ``shard_with_fsdp`` registers this method as a forward of the root: its
        pre-forward hook gathers the root group (and, on the first call, makes this module the root
        that FSDP initialises from, whichever module runs first). The layers' groups are gathered
        here, once each in the same order on every rank, and kept through the layers' own forwards
        inside ``run``: the ranks' rollouts run different numbers of forwards, so a gather per
        forward would be a collective that not every rank joins. Then they are freed; the root
        group stays gathered until the next backward, as FSDP keeps a root after its forward.
        Elsewhere it only calls ``run``."""
        from torch.distributed.fsdp import FSDPModule

        layers = [m for m in self.student.modules() if isinstance(m, FSDPModule)]
        for layer in layers:
            layer.unshard()
            layer.set_reshard_after_forward(False, recurse=False)
        try:
            return run()
        finally:
            for layer in layers:
                layer.set_reshard_after_forward(True, recurse=False)
                layer.reshard()


def shard_with_fsdp(model: StudentLoss, device: torch.device) -> StudentLoss:
    """Applies FSDP2 over all ranks: one group per decoder layer, the root ``model`` the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = getattr(model.student.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model.student).__name__} has no decoder .layers to shard with FSDP")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # the root keeps FSDP's default: not resharded after forward, since backward needs it at once
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "with_full_weights")
    return model


class DistillationTrainer:
    """Trains ``student`` towards ``teacher`` on ``problems`` (``motab.data.load_problems``)."""

    def __init__(self, student, teacher, tokenizer, problems: list[Problem], config: TrainConfig) -> None:
        if not problems:
            raise ValueError("no problems to train on")
        self.student, self.teacher, self.tokenizer, self.problems, self.config = (
            student,
            teacher,
            tokenizer,
            problems,
            config,
        )
        self.device = next(student.parameters()).device
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        if config.prompts_per_step % (self.world * config.micro_batch):
            raise ValueError(
                f"prompts_per_step ({config.prompts_per_step}) must split evenly into {self.world} rank(s) × "
                f"micro_batch ({config.micro_batch})"
            )
        self.per_rank = config.prompts_per_step // self.world
        # an unknown tracker, or one whose package is missing, is refused before any model work
        self.trackers = Trackers(config, self.rank)
        # the ids both heads are scored over, checked before any rollout (heads padded differently,
        # as Qwen2.5-7B's and 1.5B's are, train over the tokenizer's ids only)
        self.vocab = shared_vocab(student, teacher, tokenizer, config.rollout.vocab_size)
        self.teacher.eval().requires_grad_(False)
        self.loss_fn = TrajectoryDistillationLoss(
            kind=config.loss_kind,
            beta=config.loss_beta,
            temperature=config.loss_temperature,
            student_weight=config.student_token_weight,
            teacher_weight=config.teacher_token_weight,
        )
        if config.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        longest = max(len(p.prompt_ids) for p in problems)
        pool = pool_tokens([student, teacher], self.per_rank, longest, config.rollout)  # both pools sized together
        self.paged = [paged_for_rollouts(m, self.per_rank, longest, config.rollout, pool) for m in (student, teacher)]
        self.sharded = config.parallel == "fsdp" and self.world > 1
        self.student_loss = StudentLoss(student, self.loss_fn, self.vocab)
        self.train_model = self._distribute(self.student_loss)
        # after sharding: under FSDP the optimizer steps the shards
        self.optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule)
        self.step = 0
        self.out = Path(config.output_dir)
        self.last_checkpoint: Path | None = None  # the newest checkpoint whose rename succeeded

    def _distribute(self, model: StudentLoss) -> nn.Module:
        """The module the training forward runs through: ``model`` itself on one process, else
        sharded by FSDP or replicated under DDP (gradients averaged over the ranks)."""
        if self.world == 1:
            return model
        if self.sharded:
            return shard_with_fsdp(model, self.device)
        device_ids = [self.device] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # ---------------------------------------------------------------------------------------
    def _schedule(self, step: int) -> float:
        """Linear warm-up to the peak rate, then cosine decay to 0 at the last step."""
        warmup, total = self.config.warmup_steps, self.config.steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def step_problems(self, step: int) -> list[Problem]:
        """The problems of a step: a fixed function of the seed and the step (resumable)."""
        rng = random.Random(self.config.seed * 1_000_003 + step)
        return [self.problems[rng.randrange(len(self.problems))] for _ in range(self.config.prompts_per_step)]

    def train(self, resume: bool = False, progress: bool = True, overwrite: bool = False) -> list[dict]:
        """Runs to ``config.steps``; returns the metrics of the steps run now. A used output folder
        needs ``resume`` (continue from its latest checkpoint) or ``overwrite`` (clear the run's own
        files first). SIGTERM, as SIGINT, saves a checkpoint and raises KeyboardInterrupt."""
        self._prepare_folder(resume, overwrite)
        if resume:
            self.load_latest()
            if self.rank == 0:  # the steps after the checkpoint run again and are logged again
                cut_metrics(self.out / "metrics.jsonl", self.step)
            self._barrier()
        history = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.config.steps, initial=self.step, desc="motab train", unit="step")
        self.trackers.begin(self.step, self.student, self.tokenizer, self.optimizer, self.scheduler)
        try:
            with sigterm_as_interrupt():
                history = self._train_loop(bar)
        finally:
            if bar is not None:
                bar.close()
            self.trackers.end()  # an interrupted run's trackers are closed too (files flushed, runs finished)
        return history

    def _prepare_folder(self, resume: bool, overwrite: bool) -> None:
        """Refuses a used folder without ``resume``/``overwrite`` (every rank sees the same folder,
        so every rank decides alike), then rank 0 clears it (overwrite) or removes the temporaries
        of saves cut short, before anything is written."""
        check_run_folder(self.out, resume, overwrite)
        self._barrier()  # every rank has looked before rank 0 changes anything
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if overwrite:
                clear_run(self.out)
            remove_temporaries(self.out)
        self._barrier()

    def _train_loop(self, bar) -> list[dict]:
        history = []
        try:
            while self.step < self.config.steps:
                metrics = self.train_step()
                history.append(metrics)
                with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
                self.trackers.log(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", interventions=metrics["interventions_per_100"])
                if self.step % self.config.save_every == 0 or self.step == self.config.steps:
                    self.save()
        except KeyboardInterrupt:
            if self.sharded:  # FSDP's way back to a usable state after a forward or backward cut short
                self.train_model.reset_iter_state()
            if self.last_checkpoint is None or self.last_checkpoint.name != f"checkpoint-{self.step}":
                self.save()  # (a signal deferred through a save arrives after it: that step is saved)
            raise
        return history

    def train_step(self) -> dict:
        config = self.config
        # an interrupt inside this step saves the state before it, RNG included, so that a resume
        # draws the same numbers as an uninterrupted run
        self._rng_before_step = (self.step, rng_state())
        start = time.perf_counter()
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        problems = self.step_problems(self.step)[mine]
        seeds = [
            config.seed * 1_000_003 + self.step * config.prompts_per_step + i for i in range(config.prompts_per_step)
        ][mine]
        trajectories = self._rollout([p.prompt_ids for p in problems], seeds)
        examples = [trajectory_targets(t.prompt, t.tokens, t.sources) for t in trajectories]
        counted = sum(self.loss_fn.count(torch.tensor(codes)) for _, _, codes in examples)
        total = int(self._all_ranks(counted))
        loss_sum = 0.0
        starts = range(0, len(examples), config.micro_batch)
        for first in starts:
            batch = slice(first, first + config.micro_batch)
            # gradients are reduced once, after the last micro-batch
            with self._gradient_sync(first == starts[-1]):
                loss_sum += self._micro_step(examples[batch], trajectories[batch], max(total, 1))
        loss_sum = self._all_ranks(loss_sum)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses; scheduler.step() sets the next
        # an interrupt between the optimizer's step and the step count would save a state that is
        # neither step: SIGINT/SIGTERM wait until both are done
        with _interrupts_deferred():
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        tokens = sum(len(t.tokens) for t in trajectories)
        student_scores = [
            s for t in trajectories for s, src in zip(t.scores, t.sources) if src == "student" and math.isfinite(s)
        ]
        return dict(
            step=self.step,
            loss=loss_sum,
            lr=lr,
            loss_tokens=total,
            student_tokens=sum(t.sources.count("student") for t in trajectories),
            teacher_tokens=sum(t.sources.count("teacher") for t in trajectories),
            interventions_per_100=round(100 * sum(len(t.interventions) for t in trajectories) / max(tokens, 1), 3),
            mean_score=sum(student_scores) / len(student_scores) if student_scores else None,
            tokens_per_s=tokens / (time.perf_counter() - start),
        )

    def _rollout(self, prompts: list[list[int]], seeds: list[int]) -> list:
        """This rank's trajectories, rolled out by the current student in eval mode, no gradient."""
        config = self.config
        self.student.eval()
        with torch.no_grad():
            trajectories = self.student_loss.with_full_weights(
                lambda: rollout(
                    *self.paged,
                    prompts,
                    config.rollout,
                    seeds=seeds,
                    tokenizer=self.tokenizer,
                    keep_teacher_hidden=config.reuse_teacher_hidden,
                )
            )
        self.student.train()
        return trajectories

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Has the next backward reduce gradients over the ranks only if ``sync``: FSDP is told so
        now, DDP by the context returned (the context to run the micro-batch in)."""
        if self.sharded:
            self.train_model.set_requires_gradient_sync(sync)
        elif self.world > 1 and not sync:
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    def _all_ranks(self, value: float) -> float:
        """Sum of ``value`` over the ranks (the value itself on one process)."""
        if self.world == 1:
            return value
        tensor = torch.tensor(float(value), device=self.device, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item()

    def _micro_step(self, examples, trajectories, normalizer: int) -> float:
        """Forward and backward of a micro-batch; its loss is already divided by the step's count
        over all ranks. DDP and FSDP average gradients over the ranks where the sum is wanted, so
        the backward runs on world_size × the loss."""
        width = max(len(ids) for ids, _, _ in examples)
        pad = lambda rows, value: torch.tensor([r + [value] * (width - len(r)) for r in rows], device=self.device)  # noqa: E731
        ids = pad([e[0] for e in examples], 0)
        targets = pad([e[1] for e in examples], 0)
        codes = pad([e[2] for e in examples], NO_LOSS)
        mask = pad([[1] * len(e[0]) for e in examples], 0)
        loss_positions = codes != NO_LOSS
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            teacher_hidden = self._teacher_hidden(ids, mask, loss_positions, trajectories)
            teacher_head, teacher_bias = lm_head(self.teacher, self.vocab)
            loss = self.train_model(
                ids,
                mask,
                loss_positions,
                targets[loss_positions],
                codes[loss_positions],
                teacher_hidden,
                teacher_head,
                teacher_bias,
                normalizer,
            )
        (loss * self.world).backward()
        return float(loss.detach())

    def _teacher_hidden(self, ids, mask, loss_positions, trajectories) -> torch.Tensor:
        """Teacher hidden states at the loss positions, in row-major order: from the rollout when
        it kept them (position len(prompt) − 1 + i predicts response token i), else a forward."""
        if all(t.teacher_hidden is not None for t in trajectories):
            # loss positions of a row are exactly its response positions but the last
            return torch.cat([t.teacher_hidden[: len(t.tokens)] for t in trajectories]).to(self.device)
        with torch.no_grad():
            hidden = final_hidden_states(self.teacher, ids, mask)
        return hidden[loss_positions]

    # --- checkpoints (their format and atomic write: motab.checkpoint) -------------------------
    def save(self) -> Path:
        """Writes checkpoint-<step> atomically and points ``latest`` at it; every rank calls it.
        SIGINT and SIGTERM wait until it is done (a second Ctrl-C must not leave only the temporary
        folder), then the checkpoints past ``save_total_limit`` go and rank 0 redraws the loss curve."""
        with _interrupts_deferred():
            final = self._save_checkpoint()
            if self.rank == 0:
                for folder in checkpoints_to_delete(self.out, self.config.save_total_limit):
                    shutil.rmtree(folder)
                self._draw_curves()
        return final

    def _save_checkpoint(self) -> Path:
        def write_part(folder: Path) -> None:  # sharded, every rank writes its shards; else rank 0 all
            if self.sharded:
                self._save_sharded(folder)
            elif self.rank == 0:
                self._save_replicated(folder)

        final = save_atomically(self.out, self.step, write_part, self.rank, self.world)
        self.last_checkpoint = final  # only once its rename succeeded
        return final

    def _draw_curves(self) -> None:
        """``loss.png``: the loss per step of the whole run (``metrics.jsonl``), beside it the
        interventions per 100 tokens where the mode has the teacher intervene."""
        from motab.plots import plot_training_curves

        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        metrics = [m for m in map(metrics_line, path.read_text(encoding="utf-8").splitlines()) if m]
        monitored = policy_of(self.config.rollout.mode).monitors
        temporary = self.out / ".loss.png.tmp"
        plot_training_curves(metrics, temporary, interventions=monitored)
        os.replace(temporary, self.out / "loss.png")

    def _save_replicated(self, folder: Path) -> None:
        """Rank 0's whole checkpoint: student, optimizer, scheduler, step, its RNG states."""
        save_replicated(
            folder, self.student, self.tokenizer, self.optimizer, self._progress_state(), self._resumable_rng()
        )

    def _save_sharded(self, folder: Path) -> None:
        """This rank's part of a sharded checkpoint (rank 0's with the gathered student)."""
        save_sharded(
            folder,
            self.train_model,
            self.optimizer,
            self.student,
            self.tokenizer,
            self._progress_state(),
            self._resumable_rng(),
            self.rank,
        )

    def _progress_state(self) -> dict:
        return progress_state(self.scheduler, self.step, self.world, self.config)

    def _resumable_rng(self) -> dict:
        """The RNG states at the start of step ``self.step``: taken then if that step was begun
        (and cut short), else now."""
        step, state = getattr(self, "_rng_before_step", (None, None))
        return state if step == self.step else rng_state()

    def full_student_state(self) -> dict[str, torch.Tensor]:
        """The student's whole state dict. Under FSDP every rank must call it: the shards are
        gathered one tensor at a time to rank 0's CPU memory (the other ranks get ``{}``)."""
        return full_student_state(self.student, self.sharded)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def load_latest(self) -> None:
        """Restores the student, optimizer, scheduler, RNG and step of the latest checkpoint, after
        checking that it fits the student (ConfigError naming the first parameter that does not)
        and warning of every setting changed since it was written."""
        folder = latest_checkpoint(self.out)
        check_fits(folder, self.student, self.sharded)
        state = read_progress(folder)
        if self.rank == 0:
            for change in changed_settings(state.get("config", {}), asdict(self.config)):
                warnings.warn(f"resuming {folder}: {change}", ResumeWarning, stacklevel=3)
        if self.sharded:
            load_sharded(folder, self.train_model, self.optimizer, state["world"], self.rank, self.world)
        else:
            load_replicated(folder, self.student, self.optimizer, state, self.device)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]


class Trackers:
    """The experiment trackers ``TrainConfig.report_to`` names, through transformers' own reporting
    integrations (``TensorBoardCallback``, ``TrackioCallback``, ``WandbCallback``, ...), called as
    its Trainer calls them: ``on_train_begin``, ``on_log`` with each metrics line (its numbers, the
    step as ``global_step``), ``on_train_end``. Rank 0 alone reports.

    Built on every rank, when the trainer is: a name transformers does not know, or a tracker whose
    package is missing (its callback refuses to be made), is a ConfigError on all ranks alike,
    before any rollout. The callbacks read the run from a ``TrainingArguments`` holding the settings
    that mean the same there (``output_dir``: TensorBoard writes under ``output_dir/runs/``, W&B and
    the others log them as the run's parameters) and from a ``TrainerState``."""

    def __init__(self, config: TrainConfig, rank: int) -> None:
        self.callbacks: list = []
        if not config.trackers:
            return  # a run that reports nowhere imports nothing of transformers' Trainer
        from transformers import TrainerControl, TrainerState, TrainingArguments
        from transformers.integrations import INTEGRATION_TO_CALLBACK, get_reporting_integration_callbacks

        unknown = [name for name in config.trackers if name not in ("all", *INTEGRATION_TO_CALLBACK)]
        if unknown:  # transformers' own ValueError ("... is not supported"), in our words
            raise ConfigError(
                f"train.report_to: unknown tracker {unknown[0]!r}; expected none, all or some of "
                + ", ".join(INTEGRATION_TO_CALLBACK)
            )
        self.args = TrainingArguments(
            output_dir=str(config.output_dir),
            report_to=list(config.trackers),
            max_steps=config.steps,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps,
            max_grad_norm=config.max_grad_norm,
            seed=config.seed,
            logging_steps=1,
            save_steps=config.save_every,
            save_total_limit=config.save_total_limit,
        )
        # args.report_to as the Trainer reads it: "all" expanded to the trackers installed
        for name, callback in zip(self.args.report_to, get_reporting_integration_callbacks(self.args.report_to)):
            try:
                made = callback()
            except (ImportError, RuntimeError, ValueError) as error:  # its package is not installed
                message = " ".join(str(error).split())  # one line
                raise ConfigError(f"train.report_to: cannot report to {name}: {message}") from error
            if rank == 0:
                self.callbacks.append(made)
        self.state = TrainerState(max_steps=config.steps, logging_steps=1, save_steps=config.save_every)
        self.control = TrainerControl()
        self.objects: dict = {}

    def begin(self, step: int, student: nn.Module, tokenizer, optimizer, scheduler) -> None:
        """``on_train_begin`` at ``step`` (a resumed run's checkpoint step), with the objects the
        Trainer hands its callbacks (the student's config is logged as the model's)."""
        if not self.callbacks:
            return
        self.state.global_step = step
        self.objects = dict(
            model=student,
            processing_class=tokenizer,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            train_dataloader=None,
            eval_dataloader=None,
        )
        self._event("on_train_begin")

    def log(self, metrics: dict) -> None:
        """``on_log`` with a metrics line's numbers (``mean_score`` is null when no student token
        was scored: then it is left out), at its step."""
        if not self.callbacks:
            return
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.state.global_step = metrics["step"]
        self.state.log_history.append(dict(numbers))
        self._event("on_log", logs=numbers)

    def end(self) -> None:
        """``on_train_end``: the trackers close their files and finish their runs."""
        self._event("on_train_end")

    def _event(self, name: str, **kwargs) -> None:
        for callback in self.callbacks:
            # a callback's TrainerControl (stop, save, evaluate) is for a Trainer's loop, not this one
            getattr(callback, name)(self.args, self.state, self.control, **self.objects, **kwargs)


# --- interrupts: the loop's, so they stay beside it. A SIGTERM ends the loop as Ctrl-C does (which
# saves), and both wait for the blocks that must not be cut in two: a save, and the optimizer's step
# with the step count (a state that is neither step could not be resumed).


@contextlib.contextmanager
def _interrupts_deferred():
    """SIGINT and SIGTERM wait until the block is done, then reach their own handlers (a block
    that raises drops them: it is already on its way out)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    previous = {kind: signal.signal(kind, lambda number, frame: caught.append(number)) for kind in kinds}
    try:
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler if handler is not None else signal.SIG_DFL)
    if caught:
        signal.raise_signal(caught[0])
