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

Data parallel: launched with ``torchrun`` / ``accelerate launch`` (the CLI sets up the process
group), each rank rolls out and trains on its share of the step's prompts; gradients are averaged
by DDP and the loss is normalised by the loss tokens over all ranks, so N ranks compute the same
step as one. FSDP / ZeRO-3 are not supported: the fused op needs each rank to hold the whole
LM-head weight (DDP does).

Every ``save_every`` steps (and on Ctrl-C) a checkpoint is written atomically (a temporary folder
renamed into place): the student (``save_pretrained``, safetensors), optimizer, scheduler, RNG
states and the step. ``resume=True`` continues from the latest checkpoint to the same parameters an
uninterrupted run reaches (bit for bit on CPU). Metrics go to ``metrics.jsonl``, one line a step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from motab.config import TrainConfig
from motab.data import Problem
from motab.engine import paged_for_rollouts, rollout
from motab.losses import NO_LOSS, TrajectoryDistillationLoss, trajectory_targets
from motab.models import final_hidden_states, lm_head, shared_vocab


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
        self.optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule)
        if config.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        longest = max(len(p.prompt_ids) for p in problems)
        self.paged = [paged_for_rollouts(m, self.per_rank, longest, config.rollout) for m in (student, teacher)]
        # the forward that trains: through DDP when data parallel (gradients averaged over ranks)
        self.train_model = student
        if self.world > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
        self.step = 0
        self.out = Path(config.output_dir)

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

    def train(self, resume: bool = False, progress: bool = True) -> list[dict]:
        """Runs to ``config.steps``; returns the metrics of the steps run now."""
        if resume:
            self.load_latest()
        self.out.mkdir(parents=True, exist_ok=True)
        history = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.config.steps, initial=self.step, desc="motab train", unit="step")
        try:
            while self.step < self.config.steps:
                metrics = self.train_step()
                history.append(metrics)
                with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", interventions=metrics["interventions_per_100"])
                if self.step % self.config.save_every == 0 or self.step == self.config.steps:
                    self.save()
        except KeyboardInterrupt:
            self.save()
            raise
        finally:
            if bar is not None:
                bar.close()
        return history

    def train_step(self) -> dict:
        config = self.config
        start = time.perf_counter()
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        problems = self.step_problems(self.step)[mine]
        seeds = [
            config.seed * 1_000_003 + self.step * config.prompts_per_step + i for i in range(config.prompts_per_step)
        ][mine]
        self.student.eval()
        with torch.no_grad():
            prompts = [p.prompt_ids for p in problems]
            keep = config.reuse_teacher_hidden
            trajectories = rollout(
                *self.paged, prompts, config.rollout, seeds=seeds, tokenizer=self.tokenizer, keep_teacher_hidden=keep
            )
        self.student.train()
        examples = [trajectory_targets(t.prompt, t.tokens, t.sources) for t in trajectories]
        counted = sum(self.loss_fn.count(torch.tensor(codes)) for _, _, codes in examples)
        total = int(self._all_ranks(counted))
        loss_sum = 0.0
        starts = range(0, len(examples), config.micro_batch)
        for first in starts:
            batch = slice(first, first + config.micro_batch)
            # gradients are all-reduced once, after the last micro-batch
            sync = first == starts[-1] or self.world == 1
            with contextlib.nullcontext() if sync else self.train_model.no_sync():
                loss_sum += self._micro_step(examples[batch], trajectories[batch], max(total, 1))
        loss_sum = self._all_ranks(loss_sum)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), config.max_grad_norm)
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
            lr=self.scheduler.get_last_lr()[0],
            loss_tokens=total,
            student_tokens=sum(t.sources.count("student") for t in trajectories),
            teacher_tokens=sum(t.sources.count("teacher") for t in trajectories),
            interventions_per_100=round(100 * sum(len(t.interventions) for t in trajectories) / max(tokens, 1), 3),
            mean_score=sum(student_scores) / len(student_scores) if student_scores else None,
            tokens_per_s=tokens / (time.perf_counter() - start),
        )

    def _all_ranks(self, value: float) -> float:
        """Sum of ``value`` over the ranks (the value itself on one process)."""
        if self.world == 1:
            return value
        tensor = torch.tensor(float(value), device=self.device, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item()

    def _micro_step(self, examples, trajectories, normalizer: int) -> float:
        """Forward and backward of a micro-batch; its loss is already divided by the step's count
        over all ranks. DDP averages gradients over the ranks where the sum is wanted, so the
        backward runs on world_size × the loss."""
        width = max(len(ids) for ids, _, _ in examples)
        pad = lambda rows, value: torch.tensor([r + [value] * (width - len(r)) for r in rows], device=self.device)  # noqa: E731
        ids = pad([e[0] for e in examples], 0)
        targets = pad([e[1] for e in examples], 0)
        codes = pad([e[2] for e in examples], NO_LOSS)
        mask = pad([[1] * len(e[0]) for e in examples], 0)
        loss_positions = codes != NO_LOSS
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            student_hidden = final_hidden_states(self.train_model, ids, mask)
            teacher_hidden = self._teacher_hidden(ids, mask, loss_positions, trajectories)
            (student_head, student_bias), (teacher_head, teacher_bias) = (
                lm_head(m, self.vocab) for m in (self.train_model, self.teacher)
            )
            out = self.loss_fn(
                student_hidden[loss_positions],
                student_head,
                teacher_hidden,
                teacher_head,
                targets[loss_positions],
                codes[loss_positions],
                normalizer=normalizer,
                student_bias=student_bias,
                teacher_bias=teacher_bias,
            )
        (out.loss * self.world).backward()
        return float(out.loss.detach())

    def _teacher_hidden(self, ids, mask, loss_positions, trajectories) -> torch.Tensor:
        """Teacher hidden states at the loss positions, in row-major order: from the rollout when
        it kept them (position len(prompt) − 1 + i predicts response token i), else a forward."""
        if all(t.teacher_hidden is not None for t in trajectories):
            # loss positions of a row are exactly its response positions but the last
            return torch.cat([t.teacher_hidden[: len(t.tokens)] for t in trajectories]).to(self.device)
        with torch.no_grad():
            hidden = final_hidden_states(self.teacher, ids, mask)
        return hidden[loss_positions]

    # ---------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Writes checkpoint-<step> atomically and points ``latest`` at it (rank 0 only)."""
        final = self.out / f"checkpoint-{self.step}"
        if self.rank != 0:
            dist.barrier()
            return final
        temporary = self.out / f".checkpoint-{self.step}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        self.student.save_pretrained(temporary / "student", safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(temporary / "student")
        torch.save(
            dict(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                step=self.step,
                torch_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                python_rng=random.getstate(),
                numpy_rng=np.random.get_state(),
                config=asdict(self.config),
            ),
            temporary / "trainer_state.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        pointer = self.out / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, self.out / "latest")
        if self.world > 1:
            dist.barrier()
        return final

    def load_latest(self) -> None:
        """Restores the student, optimizer, scheduler, RNG and step of the latest checkpoint."""
        pointer = self.out / "latest"
        if not pointer.exists():
            raise FileNotFoundError(f"no checkpoint to resume from in {self.out} (no 'latest' file)")
        folder = self.out / pointer.read_text().strip()
        from safetensors.torch import load_file

        weights = {}
        for shard in sorted((folder / "student").glob("*.safetensors")):
            weights.update(load_file(shard, device=str(self.device)))
        missing, unexpected = self.student.load_state_dict(weights, strict=False)
        # tied weights are stored once: anything missing must be tied to something loaded
        if unexpected or any(not self._is_tied(name) for name in missing):
            raise RuntimeError(
                f"checkpoint {folder} does not fit the student: missing {missing}, unexpected {unexpected}"
            )
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])

    def _is_tied(self, name: str) -> bool:
        return getattr(self.student.config, "tie_word_embeddings", False) and name.startswith("lm_head")
