"""The MOTAB rollout: the student drafts, the teacher verifies in one forward, the fused op scores
every drafted token, the monitor finds each row's first stray, and a row that strayed is cut back
in place and corrected by the teacher before the student goes on. The baselines are modes of the
same engine, so comparisons are fair.

Alignment invariant (as in speculative decoding): for every row both caches hold the committed
tokens but the last, which is *pending* (committed, not yet fed). The student drafts by feeding
the pending token and its own draft one at a time; the teacher reads ``[pending, d1 … d(k−1)]``
in one forward, which gives its distribution for each drafted token.

After a stray the row keeps its safe prefix (``token`` level: everything before the first stray
token; ``step`` level: up to the last step delimiter committed since the row's last intervention,
else token level), both caches are truncated to it (the last kept token becomes pending again),
the monitor forgets the scores past it, and the teacher feeds the pending token and writes its
intervention (``intervention_len`` tokens, or until it ends a step); the student's cache then reads
the intervention in one extend and the row goes on. Interventions of all rows ride in one batched
teacher forward per token. After ``max_interventions`` a row runs unmonitored.

Modes: ``motab``; ``on_policy`` (student writes, teacher only scores: GKD with λ=1);
``off_policy`` (teacher writes every token); ``skd`` (a student token outside the teacher's top
``skd_top_k`` is replaced by a teacher sample, no backtracking); ``adaswitch`` (the first stray
hands the rest of the row to the teacher, no backtracking).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from motab.config import RolloutConfig, SamplingConfig
from motab.models import PagedModel
from motab.monitor import Monitor
from motab_kernels import OutOfBlocksError, fused_linear_divergence, ragged

# RolloutConfig is frozen: one shared default is safe.
DEFAULT_ROLLOUT = RolloutConfig()


@dataclass
class Trajectory:
    """One row's rollout. ``sources[i]`` says who wrote ``tokens[i]`` ("student" or "teacher");
    ``scores``/``boundaries`` are the monitored score of a student token and the boundary it was
    held to (NaN where none applied: teacher tokens, unmonitored or warm-up tokens have +inf)."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    boundaries: list[float] = field(default_factory=list)
    discarded: list[dict] = field(default_factory=list)  # {"position", "tokens", "scores"} per backtrack
    interventions: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in tokens
    counters: dict = field(default_factory=lambda: dict(drafted=0, backtracks=0, discarded_tokens=0))
    finish_reason: str | None = None
    # [len(tokens), teacher hidden] final hidden states whose LM-head output predicted each token
    # (``rollout(..., keep_teacher_hidden=True)``): the teacher side of the distillation loss, already computed.
    teacher_hidden: torch.Tensor | None = None

    def to_dict(self) -> dict:
        """JSON-ready (NaN and inf become None; teacher_hidden is left out)."""
        out = asdict(replace(self, teacher_hidden=None))
        del out["teacher_hidden"]
        for key in ("scores", "boundaries"):
            out[key] = [None if not math.isfinite(x) else x for x in out[key]]
        return out


@dataclass
class _Row:
    index: int
    trajectory: Trajectory
    seed: int
    student_draws: int = 0  # tokens this row's student stream has sampled (the RNG counter)
    teacher_draws: int = 0
    teacher_writes: bool = False  # off_policy, or adaswitch after its switch
    hidden: list[torch.Tensor] = field(default_factory=list)  # teacher hidden per committed token
    interventions_used: int = 0
    since_intervention: int = 0  # response index where the current student stretch starts
    finished: bool = False

    @property
    def sequence(self) -> list[int]:
        return self.trajectory.prompt + self.trajectory.tokens


def rollout(
    student: PagedModel | torch.nn.Module | None,
    teacher: PagedModel | torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: RolloutConfig = DEFAULT_ROLLOUT,
    *,
    seeds: Sequence[int] | None = None,
    tokenizer=None,
    teacher_tokenizer=None,
    timings: dict[str, float] | None = None,
    keep_teacher_hidden: bool = False,
) -> list[Trajectory]:
    """Rolls out every prompt (token ids) under ``config``; ``seeds[i]`` (default ``i``) fixes
    row i's sampling, whatever else is in the batch. HF models are wrapped in PagedModels whose
    caches are sized up front (prompt + max_new_tokens + draft + intervention per row), so a
    rollout cannot run out of cache midway. ``tokenizer`` (and the teacher's, to compare) fills
    the vocabulary size, EOS, step delimiters and stop strings. A ``timings`` dict receives
    seconds per phase (prefill, student_decode, teacher_verify, fused_op, monitor, truncation,
    intervention, teacher_decode); measuring synchronises the device, so time throughput without it.
    ``keep_teacher_hidden`` fills ``Trajectory.teacher_hidden`` (the trainer reuses them instead of
    running the teacher again)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if student is None and config.mode != "off_policy":
        raise ValueError(f"mode {config.mode!r} needs a student model (only off_policy runs the teacher alone)")
    if tokenizer is not None and teacher_tokenizer is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    if tokenizer is not None:
        config = with_tokenizer_defaults(config, tokenizer)
    longest = max(len(p) for p in prompts)
    models = []
    for model in (teacher, student):
        if model is None:  # off_policy without a student: the teacher's cache stands in, unused
            model = models[0]
        elif not isinstance(model, PagedModel):
            model = paged_for_rollouts(model, len(prompts), longest, config)
        else:
            _check_capacity(model, prompts, _tokens_per_row(0, config))
        models.append(model)
    teacher_model, student_model = models
    engine = _Engine(student_model, teacher_model, config, tokenizer, timings, keep_teacher_hidden)
    return engine.run(prompts, seeds or list(range(len(prompts))))


def _tokens_per_row(prompt_len: int, config: RolloutConfig) -> int:
    """The most tokens a row's cache can hold during a rollout: prompt, response, a draft past
    the committed tokens and an intervention."""
    return prompt_len + config.max_new_tokens + config.draft_len + config.intervention_len + 1


def paged_for_rollouts(model: torch.nn.Module, rows: int, longest_prompt: int, config: RolloutConfig) -> PagedModel:
    """A PagedModel whose cache holds ``rows`` rollouts of prompts up to ``longest_prompt`` tokens
    under ``config``: create it once and pass it to every ``rollout`` call that fits."""
    per_row = _tokens_per_row(longest_prompt, config)
    return PagedModel(
        model,
        max_rows=rows,
        max_tokens=per_row * rows,
        block_size=config.block_size,
        max_seq_len=per_row + config.block_size,
    )


def _check_capacity(model: PagedModel, prompts, extra: int) -> None:
    """A caller's PagedModel must hold the whole rollout: refuse before anything starts."""
    if model.max_rows < len(prompts):
        raise ValueError(f"the PagedModel holds {model.max_rows} rows, fewer than the {len(prompts)} prompts")
    need = model.blocks_needed([len(p) + extra for p in prompts])
    free = model.blocks_available(range(len(prompts)))
    if need > free:
        raise OutOfBlocksError(
            f"this rollout may need {need} cache blocks (prompts + max_new_tokens + draft + intervention per row) "
            f"but the PagedModel can free only {free}; nothing was started"
        )


def check_same_tokenizer(tokenizer, teacher_tokenizer) -> None:
    """Refuses two tokenizers with different vocabularies, naming both sizes."""
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"student and teacher tokenizers differ (vocabularies of {len(tokenizer)} and {len(teacher_tokenizer)} "
            "tokens): distillation token by token needs one tokenizer"
        )


def with_tokenizer_defaults(config: RolloutConfig, tokenizer) -> RolloutConfig:
    """Fills what ``config`` leaves to the tokenizer: the vocabulary size, EOS and the step
    delimiters (every token whose text holds a blank line)."""
    updates = {}
    if config.vocab_size is None:
        updates["vocab_size"] = len(tokenizer)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        updates["eos_token_ids"] = (tokenizer.eos_token_id,)
    if not config.delimiter_token_ids:
        updates["delimiter_token_ids"] = tuple(
            i for token, i in tokenizer.get_vocab().items() if "\n\n" in tokenizer.convert_tokens_to_string([token])
        )
    return replace(config, **updates)


class _Engine:
    def __init__(
        self,
        student: PagedModel,
        teacher: PagedModel,
        config: RolloutConfig,
        tokenizer=None,
        timings: dict[str, float] | None = None,
        keep_teacher_hidden: bool = False,
    ) -> None:
        self.student, self.teacher, self.config = student, teacher, config
        self.timings = timings
        self.keep_teacher_hidden = keep_teacher_hidden
        self._phases: list[str] = []  # open timing phases, innermost last
        heads = (student.lm_head.weight.shape[0], teacher.lm_head.weight.shape[0])
        if config.vocab_size is None and heads[0] != heads[1]:
            raise ValueError(
                f"vocabulary mismatch: student LM head has {heads[0]} entries, teacher {heads[1]}; pass the "
                "tokenizer (or RolloutConfig.vocab_size) to score and sample over the shared ids only"
            )
        self.vocab = config.vocab_size or heads[0]
        if self.vocab > min(heads):
            raise ValueError(f"vocab_size {self.vocab} exceeds an LM head ({heads[0]} / {heads[1]} entries)")
        monitor = config.monitor
        if config.mode == "skd":
            monitor = replace(monitor, score="teacher_rank", warmup=0)
        elif config.mode == "adaswitch":
            monitor = replace(monitor, rule="window")
        self.monitor_config = monitor
        self.delimiters = set(config.delimiter_token_ids)
        self.eos = set(config.eos_token_ids)
        self.tokenizer = tokenizer  # decodes the response for stop strings

    # ---------------------------------------------------------------------------------------
    def run(self, prompts, seeds) -> list[Trajectory]:
        rows = [_Row(i, Trajectory(list(p)), s) for i, (p, s) in enumerate(zip(prompts, seeds))]
        self.monitor = Monitor(self.monitor_config, len(rows))
        teacher_only = self.config.mode == "off_policy"
        for row in rows:
            row.teacher_writes = teacher_only
        models = [self.teacher] if teacher_only else [self.student, self.teacher]
        with self._phase("prefill"):
            for model in models:
                model.reset(range(len(rows)))
                model.extend([r.index for r in rows], [r.sequence[:-1] for r in rows])  # all but the pending token
        while True:
            active = [r for r in rows if not r.finished]
            if not active:
                break
            drafting = [r for r in active if not r.teacher_writes]
            if drafting:
                self._draft_round(drafting)
            writing = [r for r in active if r.teacher_writes and not r.finished]
            if writing:
                self._teacher_round(writing)
        if self.keep_teacher_hidden:
            for row in rows:
                row.trajectory.teacher_hidden = torch.stack(row.hidden) if row.hidden else None
        return [r.trajectory for r in rows]

    # ---------------------------------------------------------------------------------------
    def _draft_round(self, rows: list[_Row]) -> None:
        config = self.config
        lengths = [min(config.draft_len, config.max_new_tokens - len(r.trajectory.tokens)) for r in rows]
        drafts = [[] for _ in rows]
        hidden = [[] for _ in rows]
        feed = [[r.sequence[-1]] for r in rows]
        with self._phase("student_decode"):
            for step in range(max(lengths)):
                live = [i for i, n in enumerate(lengths) if n > step]
                out = self.student.extend([rows[i].index for i in live], [feed[i] for i in live])
                logits = self.student.logits(out)[:, : self.vocab]
                tokens = self._sample(logits, [rows[i] for i in live], teacher=False)
                for j, (i, token) in enumerate(zip(live, tokens)):
                    drafts[i].append(token)
                    hidden[i].append(out[j])
                    feed[i] = [token]
        for row, draft in zip(rows, drafts):
            row.trajectory.counters["drafted"] += len(draft)
        # Where each row's draft sits in every packed tensor below (verify, scores, statistics).
        offsets = ragged.cu_seqlens([len(d) for d in drafts])
        with self._phase("teacher_verify"):
            verify = self.teacher.extend(
                [r.index for r in rows], [[r.sequence[-1]] + d[:-1] for r, d in zip(rows, drafts)]
            )
        by_op = [self._decided_by_op(r) for r in rows]
        thresholds = [self.monitor.boundary(r.index) if op else math.inf for r, op in zip(rows, by_op)]
        with self._phase("fused_op"):
            stats, first_stray = self._score(
                torch.stack([h for hs in hidden for h in hs]),
                verify,
                [t for d in drafts for t in d],
                [tau for tau, d in zip(thresholds, drafts) for _ in d],
                offsets,
            )
        interventions = []
        with self._phase("monitor"):
            for i, (row, draft) in enumerate(zip(rows, drafts)):
                span = slice(int(offsets[i]), int(offsets[i + 1]))
                row_stats = {k: v[span] for k, v in stats.items()}
                decided = (first_stray[i], thresholds[i]) if by_op[i] else None
                action = self._decide_and_commit(row, draft, row_stats, verify[span], decided)
                if action is not None:
                    interventions.append((row, action))
        if interventions:
            with self._phase("intervention"):
                self._intervene(interventions)

    def _decided_by_op(self, row: _Row) -> bool:
        """Whether the fused op's threshold comparison decides this row's draft (exactly)."""
        m = self.monitor_config
        if m.score not in ("fkl", "rkl", "jsd") or not self._monitored(row):
            return False
        if m.frozen_per_draft:
            return True
        return m.rule == "fixed" and self.monitor.num_committed(row.index) >= m.warmup

    def _monitored(self, row: _Row) -> bool:
        return self.config.mode in ("motab", "skd", "adaswitch") and row.interventions_used < self._budget()

    def _score(self, student_hidden, teacher_hidden, targets, thresholds, offsets):
        """Per-token statistics of the packed drafts (rows grouped by ``offsets``) and, per row, the
        op's first stray for ``thresholds``."""
        monitor = self.monitor_config
        device = student_hidden.device
        student_bias, teacher_bias = (
            None if m.lm_head.bias is None else m.lm_head.bias[: self.vocab] for m in (self.student, self.teacher)
        )
        with torch.no_grad():
            out = fused_linear_divergence(
                student_hidden,
                self.student.lm_head.weight[: self.vocab],
                teacher_hidden,
                self.teacher.lm_head.weight[: self.vocab],
                student_bias=student_bias,
                teacher_bias=teacher_bias,
                kind=monitor.divergence_kind,
                beta=monitor.beta,
                temperature=monitor.temperature,
                target=torch.tensor(targets, device=device),
                reduction="none",
                threshold=torch.tensor(thresholds, device=device, dtype=torch.float32),
                # on the host: the op checks the offsets there and copies them over once (checking a
                # device copy would wait for the device three times a round)
                cu_seqlens=torch.from_numpy(offsets),
            )
        stats = {
            "divergence": out.per_token.tolist(),
            "teacher_logprob": out.teacher_logprob.tolist(),
            "teacher_rank": out.teacher_rank.tolist(),
        }
        return stats, out.first_stray.tolist()

    def _decide_and_commit(self, row: _Row, draft: list[int], stats: dict, teacher_hidden, decided) -> str | None:
        """Commits the row's safe prefix of ``draft``; returns the intervention it needs, if any.
        ``decided`` is (first stray, boundary) when the fused op compared already."""
        config, traj = self.config, row.trajectory
        scores = [
            self.monitor.score(d, lp, rk)
            for d, lp, rk in zip(stats["divergence"], stats["teacher_logprob"], stats["teacher_rank"])
        ]
        if decided is not None:
            first, boundaries = decided[0], [decided[1]] * len(draft)
        elif self._monitored(row):
            first, boundaries = self.monitor.scan(row.index, scores)
        else:
            first, boundaries = len(draft), [math.nan] * len(draft)
        kept = draft[:first]
        end = next((i for i in range(len(kept)) if kept[i] in self.eos or self._stops(row, kept[: i + 1])), None)
        if end is not None:  # EOS or a stop string ends the row inside the kept prefix
            kept, first = kept[: end + 1], end + 1
        start = len(traj.tokens)
        self._append(row, kept, "student", scores[: len(kept)], boundaries[: len(kept)], teacher_hidden[: len(kept)])
        self.monitor.commit(row.index, scores[: len(kept)])
        if self._finish_if_done(row):
            self._release(row)
            return None
        if first == len(draft):  # no stray: the last draft token is pending, caches already aligned
            return None
        traj.discarded.append(dict(position=start + len(kept), tokens=draft[first:], scores=scores[first:]))
        traj.counters["backtracks"] += 1
        traj.counters["discarded_tokens"] += len(draft) - first
        if config.mode == "motab" and config.backtrack == "step":
            self._back_to_step(row)
        self._truncate_to_pending(row)
        if config.mode == "adaswitch":
            row.teacher_writes = True
            return None
        return "replace" if config.mode == "skd" else "intervene"

    def _back_to_step(self, row: _Row) -> None:
        """Cuts the row further, to just after the last delimiter of its current student stretch."""
        traj = row.trajectory
        stretch = traj.tokens[row.since_intervention :]
        cut = next((i for i in range(len(stretch) - 1, -1, -1) if stretch[i] in self.delimiters), None)
        if cut is None:
            return
        keep = row.since_intervention + cut + 1
        if keep == len(traj.tokens):
            return
        dropped = traj.tokens[keep:]
        traj.discarded[-1]["position"] = keep
        traj.discarded[-1]["tokens"] = dropped + traj.discarded[-1]["tokens"]
        traj.discarded[-1]["scores"] = traj.scores[keep:] + traj.discarded[-1]["scores"]
        traj.counters["discarded_tokens"] += len(dropped)
        # every student token's score is in the monitor's history, no teacher token's is
        scored_before = sum(1 for s in traj.sources[:keep] if s == "student")
        for name in ("tokens", "sources", "scores", "boundaries"):
            del getattr(traj, name)[keep:]
        del row.hidden[keep:]
        self.monitor.rewind(row.index, scored_before)

    def _truncate_to_pending(self, row: _Row) -> None:
        """Both caches back to the committed tokens but the last (the new pending token)."""
        length = len(row.sequence) - 1
        with self._phase("truncation"):
            for model in (self.student, self.teacher):
                model.truncate([row.index], [length])

    def _release(self, row: _Row) -> None:
        """A finished row gives its cache blocks back."""
        for model in (self.student, self.teacher):
            model.reset([row.index])

    def _intervene(self, requests: list[tuple[_Row, str]]) -> None:
        """The teacher writes for every requesting row at once, then the student reads it."""
        config = self.config
        written = {row.index: [] for row, _ in requests}
        states = {row.index: [] for row, _ in requests}  # the teacher hidden behind each written token
        limits = {row.index: 1 if kind == "replace" else config.intervention_len for row, kind in requests}
        live = [row for row, _ in requests]
        feed = {row.index: [row.sequence[-1]] for row in live}
        while live:
            hidden = self.teacher.extend([r.index for r in live], [feed[r.index] for r in live])
            logits = self.teacher.logits(hidden)[:, : self.vocab]
            still = []
            for j, (row, token) in enumerate(zip(live, self._sample(logits, live, teacher=True))):
                out = written[row.index]
                out.append(token)
                states[row.index].append(hidden[j])
                feed[row.index] = [token]
                ends_step = config.intervention == "step" and token in self.delimiters
                if not (
                    token in self.eos
                    or ends_step
                    or len(out) >= limits[row.index]
                    or len(row.trajectory.tokens) + len(out) >= config.max_new_tokens
                    or self._stops(row, out)
                ):
                    still.append(row)
            live = still
        readers = []
        for row, kind in requests:
            tokens = written[row.index]
            start = len(row.trajectory.tokens)
            # the teacher fed the pending token and tokens[:-1]; the student reads the same
            feed_student = [row.sequence[-1]] + tokens[:-1]
            nan = [math.nan] * len(tokens)
            self._append(row, tokens, "teacher", nan, nan, states[row.index])
            row.trajectory.interventions.append((start, start + len(tokens)))
            if kind == "intervene":
                row.interventions_used += 1
            row.since_intervention = len(row.trajectory.tokens)
            if self._finish_if_done(row):
                self._release(row)
            else:
                readers.append((row, feed_student))
        if readers:
            self.student.extend([r.index for r, _ in readers], [f for _, f in readers])

    def _teacher_round(self, rows: list[_Row]) -> None:
        """Rows the teacher writes alone: up to ``draft_len`` tokens each, one batched step at a time."""
        config = self.config
        for _ in range(config.draft_len):
            live = [r for r in rows if not r.finished]
            if not live:
                return
            with self._phase("teacher_decode"):
                hidden = self.teacher.extend([r.index for r in live], [[r.sequence[-1]] for r in live])
            logits = self.teacher.logits(hidden)[:, : self.vocab]
            for j, (row, token) in enumerate(zip(live, self._sample(logits, live, teacher=True))):
                self._append(row, [token], "teacher", [math.nan], [math.nan], hidden[j : j + 1])
                if self._finish_if_done(row):
                    self._release(row)

    # ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _phase(self, name: str):
        """Adds the wall time of the block to ``timings[name]`` (device synchronised) when timing."""
        if self.timings is None:
            yield
            return
        _synchronize(self.student.device)
        start = time.perf_counter()
        self._phases.append(name)
        try:
            yield
        finally:
            _synchronize(self.student.device)
            elapsed = time.perf_counter() - start
            self._phases.pop()
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            if self._phases:  # a phase nested in another counts once: its parent's time excludes it
                self.timings[self._phases[-1]] = self.timings.get(self._phases[-1], 0.0) - elapsed

    def _sample(self, logits: torch.Tensor, rows: list[_Row], teacher: bool) -> list[int]:
        """One token per row, all rows in one batched draw; each row's draw depends only on its
        seed and its own counter, so a row samples the same whatever else is in the batch."""
        seeds = [(r.seed * 2 + int(teacher)) for r in rows]  # the student's and teacher's streams differ
        counters = [r.teacher_draws if teacher else r.student_draws for r in rows]
        for r in rows:
            if teacher:
                r.teacher_draws += 1
            else:
                r.student_draws += 1
        sampling = self.config.teacher_sampling if teacher else self.config.student_sampling
        return sample_tokens(logits, sampling, seeds, counters).tolist()

    def _budget(self) -> float:
        return math.inf if self.config.mode == "skd" else self.config.max_interventions

    def _append(self, row: _Row, tokens, source, scores, boundaries, teacher_hidden) -> None:
        traj = row.trajectory
        if self.keep_teacher_hidden:
            row.hidden += list(teacher_hidden)
        traj.tokens += tokens
        traj.sources += [source] * len(tokens)
        traj.scores += list(scores)
        traj.boundaries += list(boundaries)

    def _stops(self, row: _Row, new_tokens: list[int]) -> bool:
        """Whether the response with ``new_tokens`` appended contains a stop string."""
        if not (self.config.stop_strings and self.tokenizer is not None):
            return False
        text = self.tokenizer.decode(row.trajectory.tokens + new_tokens)
        return any(stop in text for stop in self.config.stop_strings)

    def _finish_if_done(self, row: _Row) -> bool:
        traj = row.trajectory
        if traj.tokens and traj.tokens[-1] in self.eos:
            traj.finish_reason = "eos"
        elif self._stops(row, []):
            traj.finish_reason = "stop"
        elif len(traj.tokens) >= self.config.max_new_tokens:
            traj.finish_reason = "length"
        row.finished = traj.finish_reason is not None
        return row.finished


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# splitmix64's constants, as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX_2 = -7723592293110705685  # 0x94D049BB133111EB


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _uniforms(seeds: torch.Tensor, counters: torch.Tensor, width: int) -> torch.Tensor:
    """``[rows, width]`` uniforms in (0, 1): splitmix64 of (seed, counter, column), counter-based so
    that a row's numbers depend on nothing but its own seed and counter."""
    columns = torch.arange(width, device=seeds.device, dtype=torch.int64)
    x = (seeds * _GOLDEN + counters)[:, None] * _GOLDEN + columns[None, :]
    x = (x ^ _logical_shift_right(x, 30)) * _MIX_1
    x = (x ^ _logical_shift_right(x, 27)) * _MIX_2
    x = x ^ _logical_shift_right(x, 31)
    return (_logical_shift_right(x, 11).to(torch.float64) + 0.5) / float(1 << 53)  # 53 random bits


def sample_tokens(
    logits: torch.Tensor, sampling: SamplingConfig, seeds: Sequence[int], counters: Sequence[int]
) -> torch.Tensor:
    """One token per row of ``logits`` [rows, V]: softmax(logits / T) restricted to the top-k and
    top-p sets, drawn by the Gumbel-max trick with per-row counter-based noise (temperature 0 is
    greedy)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, -1)
        drop = probs.cumsum(-1) - probs >= sampling.top_p  # keep the smallest prefix reaching p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
    device = logits.device
    uniforms = _uniforms(torch.tensor(seeds, device=device), torch.tensor(counters, device=device), logits.shape[-1])
    gumbel = -torch.log(-torch.log(uniforms)).to(logits.dtype)
    return (logits + gumbel).argmax(-1)
