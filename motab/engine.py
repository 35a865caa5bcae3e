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

Modes (``motab.policy``: each mode is a policy the engine reads): ``motab``; ``on_policy`` (student
writes, teacher only scores: GKD with λ=1); ``off_policy`` (teacher writes every token); ``skd`` (a
student token outside the teacher's top ``skd_top_k`` is replaced by a teacher sample, no
backtracking); ``adaswitch`` (the first stray hands the rest of the row to the teacher, no
backtracking). The paper's step modes (``motab.steps``): a draft ends at the end of its step; the
verify forward gives the step's oracle value and, where a step begins, the teacher's top-k entropy
of its boundary; ``step_motab`` rewinds a breach to the TD-error root cause and the teacher writes
the rest; ``step_skd`` lets the teacher rewrite a rejected step; ``teacher_steps`` is the teacher
writing step by step.

Each row's committed state has one owner, ``_Row``: ``commit`` and ``cut`` change the trajectory,
the kept teacher states, the monitor's history and both caches together.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace

import torch

from motab.config import RolloutConfig, SamplingConfig
from motab.models import PagedModel, lm_head, shared_vocab
from motab.monitor import Monitor
from motab.policy import POLICIES, intervention_budget, policy_for
from motab.runs import RowProgress
from motab.steps import (
    SCRIPT_SEPARATOR,
    contains_stop_at_end,
    entropy_boundary,
    oracle_value,
    root_cause,
    tail_width,
    topk_entropy,
    trim_at_stop,
)
from motab_kernels import OutOfBlocksError, fused_linear_divergence, ragged

# RolloutConfig is frozen: one shared default is safe.
DEFAULT_ROLLOUT = RolloutConfig()


@dataclass
class Trajectory:
    """One row's rollout. ``sources[i]`` says who wrote ``tokens[i]`` ("student" or "teacher");
    ``scores``/``boundaries`` are the monitored score of a student token and the boundary it was
    held to (NaN where none applied: teacher tokens, unmonitored or warm-up tokens have +inf).

    Step modes also fill ``steps``: every step written, in order, rewound ones included, as dicts
    with ``start`` (the response index where the step began), ``tokens`` (as they stood in the
    context), ``writer``, ``end`` (why it ended), ``oracle_value``, ``entropy``, ``boundary``,
    ``student_value`` (None where not computed) and ``kept`` (whether it stands in the final
    response); and ``root_cause``: the step t* a breach rewound to (None without a breach). The
    correction is then ``interventions[-1]``."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    boundaries: list[float] = field(default_factory=list)
    discarded: list[dict] = field(default_factory=list)  # {"position", "tokens", "scores"} per backtrack
    interventions: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in tokens
    counters: dict = field(default_factory=lambda: dict(drafted=0, backtracks=0, discarded_tokens=0))
    finish_reason: str | None = None
    steps: list[dict] = field(default_factory=list)
    root_cause: int | None = None
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
class _Step:
    """The step a row is writing: where it began and what was measured of it so far."""

    start: int  # response index of its first token
    writer: str
    rewrite: bool = False  # the teacher rewriting a rejected student step (step_skd)
    separator: int = 0  # tokens a trim appended after the step's text
    teacher_logprobs: list[float] = field(default_factory=list)  # of each token, temperature 1
    student_logprobs: list[float] = field(default_factory=list)  # under the student's sampling distribution
    entropy: float | None = None  # the teacher's top-k entropy before the step


class _Row:
    """One row and the only owner of its committed state: the trajectory, the teacher hidden
    states kept per token, the monitor's history of the row and both caches' lengths change
    together, through ``commit`` and ``cut``."""

    def __init__(self, index: int, prompt: list[int], seed: int, engine: _Engine) -> None:
        self.index, self.seed = index, seed
        self.trajectory = Trajectory(list(prompt))
        self._engine = engine
        self.student_draws = 0  # tokens this row's student stream has sampled (the RNG counter)
        self.teacher_draws = 0
        self.teacher_writes = engine.policy.writer == "teacher"
        self.hidden: list[torch.Tensor] = []  # teacher hidden per committed token
        self.interventions_used = 0
        self.since_intervention = 0  # response index where the current student stretch starts
        self.limit = engine.config.max_new_tokens  # response tokens this row may hold
        self.correction_start: int | None = None  # a root-cause correction under way
        self.step = _Step(0, "teacher" if self.teacher_writes else "student") if engine.policy.in_steps else None
        self.finished = False

    @property
    def sequence(self) -> list[int]:
        """Prompt and response (a copy: the per-token paths use ``pending`` and ``length``)."""
        return self.trajectory.prompt + self.trajectory.tokens

    @property
    def pending(self) -> int:
        """The last committed token, which neither cache has read yet."""
        return (self.trajectory.tokens or self.trajectory.prompt)[-1]

    @property
    def length(self) -> int:
        """Committed tokens, prompt included."""
        return len(self.trajectory.prompt) + len(self.trajectory.tokens)

    def commit(self, tokens, source: str, scores, boundaries, teacher_hidden) -> None:
        """Appends tokens to the row; a student token's score joins the monitor's history."""
        traj = self.trajectory
        if self._engine.keep_teacher_hidden:
            self.hidden += list(teacher_hidden)
        traj.tokens += tokens
        traj.sources += [source] * len(tokens)
        traj.scores += list(scores)
        traj.boundaries += list(boundaries)
        if source == "student":
            self._engine.monitor.commit(self.index, list(scores))

    def cut(self, keep: int) -> None:
        """Keeps the first ``keep`` response tokens: trims the trajectory and the kept hidden
        states, rewinds the monitor, and truncates both caches to the new pending token."""
        traj = self.trajectory
        if keep < len(traj.tokens):
            # every committed student token's score is in the monitor's history, no teacher token's is
            scored_before = sum(1 for s in traj.sources[:keep] if s == "student")
            for name in ("tokens", "sources", "scores", "boundaries"):
                del getattr(traj, name)[keep:]
            del self.hidden[keep:]
            self._engine.monitor.rewind(self.index, scored_before)
        length = self.length - 1
        for model in self._engine.models:
            if model.lengths([self.index])[0] > length:  # a cache behind (a teacher step) stays behind
                self._engine.cut_later(model, self.index, length)


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
    round_hook: Callable[[str], AbstractContextManager] | None = None,
) -> list[Trajectory]:
    """Rolls out every prompt (token ids) under ``config``; ``seeds[i]`` (default ``i``) fixes
    row i's sampling, whatever else is in the batch. HF models are wrapped in PagedModels whose
    caches are sized up front (prompt + max_new_tokens + draft + intervention per row), so a
    rollout cannot run out of cache midway. ``tokenizer`` (and the teacher's, to compare) fills
    the vocabulary size, EOS, step delimiters and stop strings; the step modes need it (their
    steps end at a stop string). A ``timings`` dict receives
    seconds per phase (prefill, student_decode, teacher_verify, fused_op, monitor, truncation,
    intervention, teacher_decode); measuring synchronises the device, so time throughput without it.
    ``keep_teacher_hidden`` fills ``Trajectory.teacher_hidden`` (the trainer reuses them instead of
    running the teacher again). ``round_hook(kind)``, when given, returns a context manager that
    wraps each round ("draft": the students draft and the teacher verifies; "teacher": the teacher
    writes): ``motab.profiling.RoundWork`` counts each round's device work through it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: pass one seed per prompt")
    if student is None and POLICIES[config.mode].writer != "teacher":
        raise ValueError(f"mode {config.mode!r} needs a student model (only teacher-written modes run without one)")
    if POLICIES[config.mode].in_steps and tokenizer is None:
        raise ValueError(f"mode {config.mode!r} writes steps up to a stop string: pass the tokenizer")
    if tokenizer is not None and teacher_tokenizer is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    if tokenizer is not None:
        config = with_tokenizer_defaults(config, tokenizer)
    longest = max(len(p) for p in prompts)
    models = []
    for model in (teacher, student):
        if model is None:  # a teacher-written mode without a student: the teacher's cache stands in, unused
            model = models[0]
        elif not isinstance(model, PagedModel):
            model = paged_for_rollouts(model, len(prompts), longest, config)
        else:
            _check_capacity(model, prompts, _tokens_per_row(0, config))
        models.append(model)
    teacher_model, student_model = models
    engine = _Engine(student_model, teacher_model, config, tokenizer, timings, keep_teacher_hidden, round_hook)
    return engine.run(prompts, seeds or list(range(len(prompts))))


def _tokens_per_row(prompt_len: int, config: RolloutConfig) -> int:
    """The most tokens a row's cache can hold during a rollout: prompt, response, a draft past
    the committed tokens and an intervention (step modes: a root-cause correction may run
    ``min_correction_tokens`` past the budget, and a trimmed step reads a few separator tokens)."""
    extra = config.min_correction_tokens + _SEPARATOR_ROOM if POLICIES[config.mode].in_steps else 0
    return prompt_len + config.max_new_tokens + config.draft_len + config.intervention_len + 1 + extra


# Cache room for the separator a trimmed step appends past the budget ("\n\n" is one or two tokens).
_SEPARATOR_ROOM = 8


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
        decode_graphs="cuda" if config.cuda_graphs else "off",
    )


def rollout_in_batches(
    student: torch.nn.Module | None,
    teacher: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: RolloutConfig,
    *,
    batch_size: int,
    seeds: Sequence[int] | None = None,
    tokenizer=None,
    desc: str = "rollout",
    progress: bool | None = None,
) -> list[Trajectory]:
    """``rollout`` of ``prompts``, ``batch_size`` rows at a time on caches allocated once (models
    that are not PagedModels yet are wrapped); ``seeds[i]`` (default i) fixes prompt i's sampling,
    so the trajectories are those of one call with every prompt. ``progress`` shows a bar of rows
    done and committed tokens/s on stderr (None: only when stderr is a terminal)."""
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    rows, longest = min(batch_size, len(prompts)), max(map(len, prompts))
    student, teacher = (
        m if m is None or isinstance(m, PagedModel) else paged_for_rollouts(m, rows, longest, config)
        for m in (student, teacher)
    )
    trajectories = []
    with RowProgress(len(prompts), desc, progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            done = rollout(student, teacher, prompts[batch], config, seeds=seeds[batch], tokenizer=tokenizer)
            bar.update(len(done), sum(len(t.tokens) for t in done))
            trajectories += done
    return trajectories


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
        round_hook: Callable[[str], AbstractContextManager] | None = None,
    ) -> None:
        self.student, self.teacher, self.config = student, teacher, config
        self.round = round_hook or (lambda kind: contextlib.nullcontext())
        self.models = (student, teacher)
        self.timings = timings
        self.keep_teacher_hidden = keep_teacher_hidden
        self._phases: list[str] = []  # open timing phases, innermost last
        self.vocab = shared_vocab(student, teacher, vocab_size=config.vocab_size)
        self.policy, self.monitor_config = policy_for(config)
        self.budget = intervention_budget(self.policy, config)
        self.delimiters = set(config.delimiter_token_ids)
        self.eos = set(config.eos_token_ids)
        self.tokenizer = tokenizer  # decodes tails for stop strings
        self._cuts: dict[PagedModel, dict[int, int]] = {}  # per model: row → length, not yet applied

    # ---------------------------------------------------------------------------------------
    def run(self, prompts, seeds) -> list[Trajectory]:
        self.monitor = Monitor(self.monitor_config, len(prompts))
        rows = [_Row(i, p, s, self) for i, (p, s) in enumerate(zip(prompts, seeds))]
        models = [self.teacher] if self.policy.writer == "teacher" else [self.student, self.teacher]
        with self.phase("prefill"):
            for model in models:
                model.reset(range(len(rows)))
                self._extend(model, rows, [r.sequence[:-1] for r in rows])  # all but the pending token
        while True:
            active = [r for r in rows if not r.finished]
            if not active:
                break
            drafting = [r for r in active if not r.teacher_writes]
            if drafting:
                with self.round("draft"):
                    self._draft_round(drafting)
            writing = [r for r in active if r.teacher_writes and not r.finished]
            if writing:
                with self.round("teacher"):
                    self._teacher_round(writing)
        self._apply_cuts()
        if self.keep_teacher_hidden:
            for row in rows:
                row.trajectory.teacher_hidden = torch.stack(row.hidden) if row.hidden else None
        return [r.trajectory for r in rows]

    # ---------------------------------------------------------------------------------------
    def _draft_round(self, rows: list[_Row]) -> None:
        drafts, hidden, sampled_logprobs, step_ends = self._draft(rows)
        for row, draft in zip(rows, drafts):
            row.trajectory.counters["drafted"] += len(draft)
        # Where each row's draft sits in every packed tensor below (verify, scores, statistics).
        offsets = ragged.cu_seqlens([len(d) for d in drafts])
        with self.phase("teacher_verify"):
            verify = self._extend(self.teacher, rows, [[r.pending] + d[:-1] for r, d in zip(rows, drafts)])
        if self.policy.step_test == "boundary":
            self._read_step_entropies(rows, verify, offsets)
        by_op = [self._decided_by_op(r) for r in rows]
        thresholds = [self.monitor.boundary(r.index) if op else math.inf for r, op in zip(rows, by_op)]
        with self.phase("fused_op"):
            stats, first_stray = self._score(
                hidden,
                verify,
                [t for d in drafts for t in d],
                [tau for tau, d in zip(thresholds, drafts) for _ in d],
                offsets,
            )
        interventions = []
        with self.phase("monitor"):
            for i, (row, draft) in enumerate(zip(rows, drafts)):
                span = slice(int(offsets[i]), int(offsets[i + 1]))
                row_stats = {k: v[span] for k, v in stats.items()}
                if self.policy.in_steps:
                    self._commit_step_draft(row, draft, row_stats, verify[span], sampled_logprobs[span])
                    continue
                decided = (first_stray[i], thresholds[i]) if by_op[i] else None
                action = self._decide_and_commit(row, draft, row_stats, verify[span], decided)
                if action is not None:
                    interventions.append((row, action))
        if self.policy.in_steps:
            self._end_steps([(r, end) for r, end in zip(rows, step_ends) if end is not None])
        if interventions:
            with self.phase("intervention"):
                self._intervene(interventions)
        self._apply_cuts()

    def _draft(self, rows: list[_Row]):
        """The student drafts for every row, one batched decode step per token. Returns the drafts,
        the student's hidden state behind each drafted token packed row by row, the student's
        log-prob of each token under its sampling distribution (packed the same way; step_skd only)
        and why each row's step ended (step modes; else None).

        The sampled ids stay on the device and feed the next step there: the host reads all drafts
        once, after the last step, so the device runs the draft's steps back to back. Step modes
        read each step's ids as they come (a step ends at a stop string, which only the host can
        find)."""
        lengths = [self._draft_length(r) for r in rows]
        step_ends: list[str | None] = [None] * len(rows)
        drafts: list[list[int]] = [[] for _ in rows]
        read_each_step = self.policy.in_steps
        outs, ids, logprobs, lives = [], [], [], []
        with self.phase("student_decode"):
            for step in range(max(lengths)):
                live = [i for i, n in enumerate(lengths) if n > step and step_ends[i] is None]
                if not live:
                    break
                if step == 0:
                    feed = [[rows[i].pending] for i in live]
                else:  # the previous step's ids of the rows still drafting, on the device
                    feed = ids[-1][:, None] if live == lives[-1] else ids[-1][_positions_in(lives[-1], live)][:, None]
                out = self._extend(self.student, [rows[i] for i in live], feed)
                logits = self.student.logits(out, self.vocab)
                tokens = self._sample(logits, [rows[i] for i in live], teacher=False)
                if self.policy.step_test == "skd_ratio":
                    logprobs.append(self._sampling_logprobs(logits, tokens))
                outs.append(out)
                ids.append(tokens)
                lives.append(live)
                if read_each_step:
                    for i, token in zip(live, tokens.tolist()):
                        drafts[i].append(token)
                        step_ends[i] = self._step_end(rows[i], drafts[i])
        if not read_each_step and ids:
            flat = torch.cat(ids).tolist()
            for live, first in zip(lives, ragged.cu_seqlens([len(live) for live in lives])):
                for j, i in enumerate(live):
                    drafts[i].append(flat[first + j])
        order = _row_major_order(lives, len(rows))
        hidden = torch.cat(outs)[order] if outs else None
        sampled = torch.cat(logprobs)[order].tolist() if logprobs else []
        return drafts, hidden, sampled, step_ends

    def _draft_length(self, row: _Row) -> int:
        """Tokens the row drafts this round: a draft, cut short by the row's budget and (step
        modes) the step's."""
        length = min(self.config.draft_len, row.limit - len(row.trajectory.tokens))
        if row.step is not None:
            length = min(length, self.config.max_step_tokens - (len(row.trajectory.tokens) - row.step.start))
        return length

    def _decided_by_op(self, row: _Row) -> bool:
        """Whether the fused op's threshold comparison decides this row's draft (exactly)."""
        m = self.monitor_config
        if m.score not in ("fkl", "rkl", "jsd") or not self._monitored(row):
            return False
        if m.frozen_per_draft:
            return True
        return m.rule == "fixed" and self.monitor.num_committed(row.index) >= m.warmup

    def _monitored(self, row: _Row) -> bool:
        return self.policy.unit == "token" and row.interventions_used < self.budget

    def _score(self, student_hidden, teacher_hidden, targets, thresholds, offsets):
        """Per-token statistics of the packed drafts (rows grouped by ``offsets``) and, per row, the
        op's first stray for ``thresholds``: computed on the device, read by the host at once."""
        monitor = self.monitor_config
        device = student_hidden.device
        (student_weight, student_bias), (teacher_weight, teacher_bias) = (
            lm_head(m, self.vocab) for m in (self.student, self.teacher)
        )
        with torch.no_grad():
            out = fused_linear_divergence(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                student_bias=student_bias,
                teacher_bias=teacher_bias,
                kind=monitor.divergence_kind,
                beta=monitor.beta,
                temperature=monitor.temperature,
                # ids, offsets on the host: the op checks them there and copies them over once
                # (checking device copies would make the host wait for the device)
                target=torch.tensor(targets),
                reduction="none",
                threshold=torch.tensor(thresholds, device=device, dtype=torch.float32),
                cu_seqlens=torch.from_numpy(offsets),
            )
            # one read: float64 holds the fp32 statistics and the integer ranks and indices exactly
            columns = (out.per_token, out.teacher_logprob, out.teacher_rank, out.first_stray)
            values = torch.cat([c.double() for c in columns]).tolist()
        n = len(targets)
        stats = {
            "divergence": values[:n],
            "teacher_logprob": values[n : 2 * n],
            "teacher_rank": [int(r) for r in values[2 * n : 3 * n]],
        }
        return stats, [int(f) for f in values[3 * n :]]

    def _decide_and_commit(self, row: _Row, draft: list[int], stats: dict, teacher_hidden, decided) -> str | None:
        """Commits the row's safe prefix of ``draft``; returns the intervention it needs, if any.
        ``decided`` is (first stray, boundary) when the fused op compared already."""
        traj = row.trajectory
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
        n = len(kept)
        row.commit(kept, "student", scores[:n], boundaries[:n], teacher_hidden[:n])
        if self._finish_if_done(row):
            self._release(row)
            return None
        if first == len(draft):  # no stray: the last draft token is pending, caches already aligned
            return None
        traj.discarded.append(dict(position=start + len(kept), tokens=draft[first:], scores=scores[first:]))
        traj.counters["backtracks"] += 1
        traj.counters["discarded_tokens"] += len(draft) - first
        row.cut(self._rewind_point(row))
        if self.policy.on_stray == "switch":
            row.teacher_writes = True
            return None
        return self.policy.on_stray

    def _rewind_point(self, row: _Row) -> int:
        """Where a token-level stray rewinds the row: its safe prefix, or with ``backtrack="step"``
        (intervening modes) just after the last delimiter of its current student stretch."""
        traj = row.trajectory
        keep = len(traj.tokens)
        if not (self.policy.on_stray == "intervene" and self.config.backtrack == "step"):
            return keep
        stretch = traj.tokens[row.since_intervention :]
        cut = next((i for i in range(len(stretch) - 1, -1, -1) if stretch[i] in self.delimiters), None)
        if cut is None or row.since_intervention + cut + 1 == keep:
            return keep
        step_end = row.since_intervention + cut + 1
        dropped = traj.tokens[step_end:]
        discarded = traj.discarded[-1]
        discarded["position"] = step_end
        discarded["tokens"] = dropped + discarded["tokens"]
        discarded["scores"] = traj.scores[step_end:] + discarded["scores"]
        traj.counters["discarded_tokens"] += len(dropped)
        return step_end

    def _release(self, row: _Row) -> None:
        """A finished row gives its cache blocks back (with the round's other cuts)."""
        for model in self.models:
            self.cut_later(model, row.index, 0)

    def cut_later(self, model: PagedModel, row: int, length: int) -> None:
        """Truncates ``row`` of ``model``'s cache to ``length`` before the next extend: all cuts of
        a round go to the cache in one call per model (one kernel launch, not one a row)."""
        cuts = self._cuts.setdefault(model, {})
        cuts[row] = min(length, cuts.get(row, length))

    def _apply_cuts(self) -> None:
        if not self._cuts:  # called before every extend: no profiler range, no timing sync for nothing
            return
        with self.phase("truncation"):
            for model, cuts in self._cuts.items():
                model.truncate(list(cuts), list(cuts.values()))
        self._cuts.clear()

    def _extend(self, model: PagedModel, rows: list[_Row], feeds) -> torch.Tensor:
        """``model.extend`` of ``feeds`` into the rows, after the cuts waiting for the caches."""
        self._apply_cuts()
        return model.extend([r.index for r in rows], feeds)

    def _intervene(self, requests: list[tuple[_Row, str]]) -> None:
        """The teacher writes for every requesting row at once, then the student reads it."""
        config = self.config
        written = {row.index: [] for row, _ in requests}
        states = {row.index: [] for row, _ in requests}  # the teacher hidden behind each written token
        limits = {row.index: 1 if kind == "replace" else config.intervention_len for row, kind in requests}
        live = [row for row, _ in requests]
        feed = {row.index: [row.pending] for row in live}
        while live:
            hidden = self._extend(self.teacher, live, [feed[r.index] for r in live])
            logits = self.teacher.logits(hidden, self.vocab)
            still = []
            for j, (row, token) in enumerate(zip(live, self._sample(logits, live, teacher=True).tolist())):
                out = written[row.index]
                out.append(token)
                states[row.index].append(hidden[j])
                feed[row.index] = [token]
                ends_step = config.intervention == "step" and token in self.delimiters
                if not (
                    token in self.eos
                    or ends_step
                    or len(out) >= limits[row.index]
                    or len(row.trajectory.tokens) + len(out) >= row.limit
                    or self._stops(row, out)
                ):
                    still.append(row)
            live = still
        readers = []
        for row, kind in requests:
            tokens = written[row.index]
            start = len(row.trajectory.tokens)
            nan = [math.nan] * len(tokens)
            row.commit(tokens, "teacher", nan, nan, states[row.index])
            row.trajectory.interventions.append((start, start + len(tokens)))
            if kind == "intervene":
                row.interventions_used += 1
            row.since_intervention = len(row.trajectory.tokens)
            if self._finish_if_done(row):
                self._release(row)
            else:
                readers.append(row)
        self._catch_up(self.student, readers)

    def _catch_up(self, model: PagedModel, rows: list[_Row]) -> None:
        """Feeds each row's committed tokens the model's cache has not read (all but the pending
        one), all rows in one extend."""
        self._apply_cuts()
        feeds = [r.sequence[model.lengths([r.index])[0] : -1] for r in rows]
        behind = [(r, f) for r, f in zip(rows, feeds) if f]
        if behind:
            self._extend(model, [r for r, _ in behind], [f for _, f in behind])

    def _teacher_round(self, rows: list[_Row]) -> None:
        """Rows the teacher writes: up to ``draft_len`` tokens each, one batched step at a time."""
        for _ in range(self.config.draft_len):
            live = [r for r in rows if not r.finished and r.teacher_writes]
            if not live:
                break
            with self.phase("teacher_decode"):
                hidden = self._extend(self.teacher, live, [[r.pending] for r in live])
            logits = self.teacher.logits(hidden, self.vocab)
            ended = []
            for j, (row, token) in enumerate(zip(live, self._sample(logits, live, teacher=True).tolist())):
                row.commit([token], "teacher", [math.nan], [math.nan], hidden[j : j + 1])
                end = self._step_end(row, []) if row.step is not None else None
                if end is not None:
                    ended.append((row, end))
                elif self._finish_if_done(row):
                    self._finish_correction(row)
                    self._release(row)
            if ended:
                self._end_steps(ended)
        # rows handed back to the student (a step_skd teacher step) read what the teacher wrote
        self._catch_up(self.student, [r for r in rows if not r.finished and not r.teacher_writes])
        self._apply_cuts()

    def _finish_correction(self, row: _Row) -> None:
        if row.correction_start is not None:
            row.trajectory.interventions.append((row.correction_start, len(row.trajectory.tokens)))
            row.correction_start = None

    # --------------------------------------------------------------------------------- steps
    def _step_end(self, row: _Row, new_tokens: list[int]) -> str | None:
        """Why the row's current step ends with ``new_tokens`` appended, if it does: its writer
        wrote EOS, the stop string, the step's budget or the row's."""
        tokens, stops = row.trajectory.tokens, [self.config.step_stop]
        written = len(tokens) - row.step.start + len(new_tokens)  # the step's tokens so far
        if not written:
            return None
        if (new_tokens or tokens)[-1] in self.eos:
            return "eos"
        if contains_stop_at_end(self.tokenizer, _tail(tokens, new_tokens, row.step.start, stops), stops):
            return "stop"
        if len(tokens) + len(new_tokens) >= row.limit:
            return "length"
        if written >= self.config.max_step_tokens:
            return "step_length"
        return None

    def _read_step_entropies(self, rows: list[_Row], verify: torch.Tensor, offsets) -> None:
        """The teacher's top-k entropy before each step that starts with this draft: read from the
        verify forward's first position of the row (the teacher's distribution after the pending
        token), the LM head applied to those positions only."""
        starting = [i for i, r in enumerate(rows) if r.step.entropy is None and offsets[i + 1] > offsets[i]]
        if not starting:
            return
        positions = torch.tensor([int(offsets[i]) for i in starting], device=verify.device)
        logits = self.teacher.logits(verify[positions], self.vocab)
        entropies = topk_entropy(logits, self.monitor_config.entropy_top_k).tolist()
        for i, h in zip(starting, entropies):
            rows[i].step.entropy = h

    def _commit_step_draft(self, row: _Row, draft, stats, teacher_hidden, sampled_logprobs) -> None:
        """Step modes commit the whole draft (it ends at the step's end at the latest): the
        teacher's log-prob of each token accumulates into the step's oracle value."""
        logprobs = stats["teacher_logprob"]
        row.commit(draft, "student", [-x for x in logprobs], [math.nan] * len(draft), teacher_hidden)
        row.step.teacher_logprobs += logprobs
        row.step.student_logprobs += sampled_logprobs

    def _end_steps(self, ended: list[tuple[_Row, str]]) -> None:
        """Closes the rows' finished steps: cuts the stop string off (``trim_stop``; the caches
        read the separator, all rows in one extend per model), records each step, applies the
        policy."""
        trims = [(row, self._trim(row)) for row, reason in ended if reason == "stop" and self.config.trim_stop]
        if trims:
            rows = [row for row, _ in trims]
            feeds = [[row.pending] + new[:-1] for row, (new, _) in trims]
            read = self._extend_split(self.teacher, rows, feeds)
            # the writer's caches were aligned before the cut; a student behind a teacher step catches up later
            students = [i for i, row in enumerate(rows) if row.step.writer == "student"]
            if students:
                self._extend_split(self.student, [rows[i] for i in students], [feeds[i] for i in students])
            for (row, (new, rest)), hidden in zip(trims, read):
                scores = [math.nan] * len(new)
                if rest:
                    logprobs = self._teacher_logprobs(hidden[:rest], new[:rest])
                    row.step.teacher_logprobs += logprobs
                    scores[:rest] = [-x for x in logprobs]
                row.commit(new, row.step.writer, scores, [math.nan] * len(new), hidden)
                row.step.separator = len(new) - rest
        for row, reason in ended:
            self._close_step(row, reason)

    def _trim(self, row: _Row) -> tuple[list[int], int]:
        """SGLang's cut of the stop string: the row is cut back to the step's tokens before it;
        returns the tokens to append (the re-tokenised rest of the text before the stop string,
        then the separator) and how many of them are that rest."""
        step = row.step
        keep, rest = trim_at_stop(self.tokenizer, row.trajectory.tokens[step.start :], self.config.step_stop)
        rest_ids = self.tokenizer.encode(rest, add_special_tokens=False) if rest else []
        row.cut(step.start + keep)
        del step.teacher_logprobs[keep:]  # the student's own log-probs keep the stop token, as the scripts'
        return rest_ids + self.tokenizer.encode(SCRIPT_SEPARATOR, add_special_tokens=False), len(rest_ids)

    def _extend_split(self, model: PagedModel, rows: list[_Row], feeds: list[list[int]]) -> list[torch.Tensor]:
        """One extend of ``feeds[i]`` into each row; each row's new hidden states."""
        hidden = self._extend(model, rows, feeds)
        offsets = ragged.cu_seqlens([len(f) for f in feeds])
        return [hidden[int(offsets[i]) : int(offsets[i + 1])] for i in range(len(rows))]

    def _teacher_logprobs(self, hidden: torch.Tensor, targets: list[int]) -> list[float]:
        """log p_teacher(target) at temperature 1 for a few positions (the LM head on those only)."""
        return _logprobs_of(self.teacher.logits(hidden, self.vocab), torch.tensor(targets)).tolist()

    def _close_step(self, row: _Row, reason: str) -> None:
        """Records the row's finished step and acts on it: the next step begins, the row ends,
        or (a breach) the policy's correction starts."""
        step, traj = row.step, row.trajectory
        end = len(traj.tokens) - step.separator
        tokens = traj.tokens[step.start : end]
        scored = step.teacher_logprobs[: len(tokens) - (reason == "eos")]  # the EOS token is not text
        record = dict(
            start=step.start,
            tokens=tokens,
            writer=step.writer,
            end=reason,
            oracle_value=None,
            entropy=step.entropy,
            boundary=None,
            student_value=None,
            kept=True,  # whether the step stands in the final text
        )
        traj.steps.append(record)
        breach = False
        if step.writer == "student" and self.policy.unit == "step":
            value = oracle_value(scored)
            record["oracle_value"] = value
            breach = self._step_breaches(record, step)
        record["kept"] = not breach
        if breach and self.policy.on_stray == "root_cause":
            self._rewind_to_root_cause(row)
        elif breach:  # teacher_step: the teacher rewrites this step from its start
            row.cut(step.start)
            traj.counters["backtracks"] += 1
            traj.counters["discarded_tokens"] += len(tokens)
            row.teacher_writes = True
            row.step = _Step(step.start, "teacher", rewrite=True)
        else:
            if step.rewrite:  # the student resumes after the teacher's step
                traj.interventions.append((step.start, end))
                row.teacher_writes = False
            row.step = _Step(len(traj.tokens), "teacher" if row.teacher_writes else "student")
        if self._finish_if_done(row):
            self._release(row)

    def _step_breaches(self, record: dict, step: _Step) -> bool:
        """The policy's test of a finished student step (an empty step never breaches)."""
        config, monitor = self.config, self.monitor_config
        value = record["oracle_value"]
        if self.policy.step_test == "boundary":
            entropy = step.entropy if monitor.adaptive_boundary else 0.0
            record["boundary"] = entropy_boundary(entropy, monitor.epsilon0, monitor.theta)
            return value is not None and value < record["boundary"]
        own = oracle_value(step.student_logprobs)
        record["student_value"] = own
        record["boundary"] = None if own is None else config.step_skd_gamma * own
        return value is not None and own is not None and not value > record["boundary"]

    def _rewind_to_root_cause(self, row: _Row) -> None:
        """The paper's breach: back to the context before step t*, the teacher writes the rest of
        the solution (no stop string; EOS or max(min_correction_tokens, budget − tokens before t*))."""
        traj = row.trajectory
        student_steps = [s for s in traj.steps if s["writer"] == "student"]
        t = root_cause([s["oracle_value"] for s in student_steps], [s["boundary"] for s in student_steps])
        traj.root_cause = t
        start = student_steps[t]["start"]
        for step in student_steps[t:]:
            step["kept"] = False
        traj.counters["backtracks"] += 1
        traj.counters["discarded_tokens"] += len(traj.tokens) - start
        row.cut(start)
        row.limit = start + max(self.config.min_correction_tokens, self.config.max_new_tokens - start)
        row.teacher_writes = True
        row.step = None
        row.correction_start = start

    # ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        """Adds the wall time of the block to ``timings[name]`` (device synchronised) when timing;
        under ``torch.profiler`` the block is a range named ``motab.<name>``."""
        if torch.autograd.profiler._is_profiler_enabled:  # checked first: a range costs an op otherwise
            with torch.profiler.record_function(f"motab.{name}"), self._timed(name):
                yield
        else:
            with self._timed(name):
                yield

    @contextlib.contextmanager
    def _timed(self, name: str):
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

    def _sample(self, logits: torch.Tensor, rows: list[_Row], teacher: bool) -> torch.Tensor:
        """One token per row (on the device), all rows in one batched draw; each row's draw depends
        only on its seed and its own counter, so a row samples the same whatever else is in the
        batch."""
        seeds = [(r.seed * 2 + int(teacher)) for r in rows]  # the student's and teacher's streams differ
        counters = [r.teacher_draws if teacher else r.student_draws for r in rows]
        for r in rows:
            if teacher:
                r.teacher_draws += 1
            else:
                r.student_draws += 1
        sampling = self.config.teacher_sampling if teacher else self.config.student_sampling
        return sample_tokens(logits, sampling, seeds, counters)

    def _sampling_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The student's log-probability of each sampled token under the distribution it sampled
        from (temperature-scaled, before top-k/top-p, as SGLang reports it; greedy counts as
        temperature 1)."""
        return _logprobs_of(logits, tokens, self.config.student_sampling.temperature or 1.0)

    def _stops(self, row: _Row, new_tokens: list[int]) -> bool:
        """Whether a stop string ends the response with ``new_tokens`` appended (its tail only)."""
        stops = self.config.stop_strings
        if not (stops and self.tokenizer is not None):
            return False
        return contains_stop_at_end(self.tokenizer, _tail(row.trajectory.tokens, new_tokens, 0, stops), stops)

    def _finish_if_done(self, row: _Row) -> bool:
        traj = row.trajectory
        if traj.tokens and traj.tokens[-1] in self.eos:
            traj.finish_reason = "eos"
        elif self._stops(row, []):
            traj.finish_reason = "stop"
        elif len(traj.tokens) >= row.limit:
            traj.finish_reason = "length"
        row.finished = traj.finish_reason is not None
        return row.finished


def _logprobs_of(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at each row's target."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(1, targets.to(logp.device).long()[:, None])[:, 0]


def _positions_in(previous: list[int], current: list[int]) -> torch.Tensor:
    """Where each of ``current`` (a subsequence of ``previous``) sits in ``previous``."""
    where = {value: j for j, value in enumerate(previous)}
    return torch.tensor([where[value] for value in current])


def _row_major_order(lives: list[list[int]], num_rows: int) -> torch.Tensor:
    """The order that turns step-major packed values (step s holds one value per row of
    ``lives[s]``) into row-major (each row's values in step order)."""
    per_row: list[list[int]] = [[] for _ in range(num_rows)]
    first = 0
    for live in lives:
        for j, i in enumerate(live):
            per_row[i].append(first + j)
        first += len(live)
    return torch.tensor([k for indices in per_row for k in indices], dtype=torch.long)


def _tail(tokens: list[int], new_tokens: list[int], start: int, stops) -> list[int]:
    """The last tokens of ``tokens[start:] + new_tokens`` that a stop check reads, without copying
    the rest (a step or a response can be 32k tokens long, checked after every token)."""
    width = tail_width(stops)
    return (tokens[max(start, len(tokens) - width) :] + new_tokens)[-width:]


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
