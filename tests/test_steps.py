"""The paper's step-level modes (step_motab, step_skd, teacher_steps) against fresh HF forwards of
the same tiny models: the oracle value, the entropy boundary, the TD-error root cause, where a step
ends in both stop modes, the correction, and the engine's alignment invariant in every mode."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from motab.config import MODES, MonitorConfig, RolloutConfig, SamplingConfig
from motab.engine import rollout
from motab.models import PagedModel
from motab.steps import contains_stop_at_end, entropy_boundary, oracle_value, root_cause, topk_entropy, trim_at_stop
from tests.engine_checks import check_invariant_every_round
from tests.tiny import hf_greedy, step_model, stop_tokenizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOKENIZER = stop_tokenizer()
STOP = ".\n\n"
STOP_ID, BLANK_ID = TOKENIZER.convert_tokens_to_ids([STOP, "\n\n"])
PROMPTS = [TOKENIZER.encode(t, add_special_tokens=False) for t in ("ab = 3", "x", "q + 7 = 9, so")]
SEEDS = [11, 12, 13]
NEVER = MonitorConfig(epsilon0=1e-30)  # no step breaches


def model(seed):
    return step_model(seed, TOKENIZER, DEVICE)


@pytest.fixture(scope="module")
def student():
    return model(0)


@pytest.fixture(scope="module")
def teacher():
    return model(1)


def config(mode="step_motab", **options):
    base = dict(
        mode=mode,
        max_new_tokens=48,
        draft_len=4,
        max_step_tokens=24,
        min_correction_tokens=8,
        student_sampling=SamplingConfig(temperature=1.0),
        teacher_sampling=SamplingConfig(temperature=0.0),
    )
    return RolloutConfig(**{**base, **options})


def teacher_logits(teacher, sequence):
    with torch.no_grad():
        return teacher(torch.tensor([sequence], device=DEVICE)).logits[0].float()


# ------------------------------------------------------------------------------ pure functions
def test_root_cause_of_planted_values():
    eps = [0.2] * 6
    assert root_cause([0.05], eps[:1]) == 0  # a breach at the first step
    # δ = [-0.1, -0.5, +0.1, -0.3]: the least is at k = 2
    assert root_cause([0.9, 0.8, 0.3, 0.4, 0.1], eps[:5]) == 2
    # δ = [-0.25, 0, -0.25]: an exact tie (dyadic values, no rounding) goes to the lowest k
    assert (0.5 - 0.75) == (0.25 - 0.5) and root_cause([0.75, 0.5, 0.5, 0.25], eps[:4]) == 1
    # the same tie after a larger δ first: still the lowest of the tied k, not the first candidate
    assert root_cause([0.75, 0.875, 0.625, 0.875, 0.625], [0.125] * 5) == 2
    # k = 2 has the least δ but its previous step was unsafe, as was k = 3's: only k = 1 qualifies
    assert root_cause([0.9, 0.8, 0.1, 0.15], [0.2, 0.85, 0.2, 0.2]) == 1
    # no candidate at all (every previous step unsafe): the step of least V, ties to the lowest k
    assert root_cause([0.3, 0.1], [0.5, 0.5]) == 1
    assert root_cause([0.25, 0.25, 0.375], [0.5, 0.5, 0.5]) == 0


def test_root_cause_reads_an_empty_step_as_safe_with_value_one():
    """An empty step (the writer ended it at once: nothing to score) has no V; it counts as a safe
    step of value 1, so the step after it can be the root cause and the steps keep their indices."""
    # V read as [0.75, 1, 0.25]: δ = [+0.25, -0.75]; the empty step 1 was safe, so k = 2 qualifies
    assert root_cause([0.75, None, 0.25], [0.5] * 3) == 2
    # V read as [1, 0.25]: k = 1 (after the empty first step) is the root cause, not step 0
    assert root_cause([None, 0.25], [0.5, 0.5]) == 1


def test_boundary_oracle_value_and_topk_entropy():
    assert entropy_boundary(0.0, 0.2, 1.0) == 0.2
    assert math.isclose(entropy_boundary(1.5, 0.2, 1.0), 0.2 * math.exp(-1.5))
    assert math.isclose(oracle_value([math.log(0.5), math.log(0.125)]), 0.25)
    assert oracle_value([]) is None
    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf], [5.0, 1.0, 1.0, 1.0]])
    h = topk_entropy(logits, 2)
    assert math.isclose(float(h[0]), math.log(2), rel_tol=1e-6)
    p = torch.softmax(torch.tensor([5.0, 1.0]), 0)
    assert math.isclose(float(h[1]), float(-(p * p.log()).sum()), rel_tol=1e-6)


class CharTokenizer:
    """Decodes a list of pieces as written (tokens that hold the stop string's start mid-token)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_trim_lands_where_sglang_cuts_the_stop_string():
    tok = CharTokenizer(["ab", "c.", "\n\n", "x.\n\n", "d", "\n\nyz"])
    assert trim_at_stop(tok, [0, 1, 2], STOP) == (1, "c")  # the stop string starts inside "c."
    assert trim_at_stop(tok, [0, 3], STOP) == (1, "x")
    assert trim_at_stop(tok, [4, 1, 5], STOP) == (1, "c")  # text after the stop inside a token is dropped
    assert trim_at_stop(TOKENIZER, [*TOKENIZER.encode("ab", add_special_tokens=False), STOP_ID], STOP) == (2, "")
    with pytest.raises(ValueError, match="does not contain"):
        trim_at_stop(tok, [0, 4], STOP)
    # the tail check sees a stop string spread over three tokens, and only the newest tail
    dot, newline = TOKENIZER.convert_tokens_to_ids([".", "\n"])
    assert contains_stop_at_end(TOKENIZER, [5, dot, newline, newline], [STOP])
    assert not contains_stop_at_end(TOKENIZER, [5, dot, newline], [STOP])


# ------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("top_k,adaptive", [(20, True), (3, True), (20, False)])
def test_oracle_values_and_boundaries_are_the_teachers_own(student, teacher, top_k, adaptive):
    """V of every step from a fresh teacher forward; H over the teacher's top ``entropy_top_k``
    tokens before the step; ε = ε0 · exp(−θ · H), or ε0 itself with the adaptive boundary off (H is
    still recorded)."""
    monitor = replace(NEVER, entropy_top_k=top_k, adaptive_boundary=adaptive)
    tokenizers = dict(tokenizer=TOKENIZER, teacher_tokenizer=TOKENIZER)
    trajectories = rollout(student, teacher, PROMPTS, config(monitor=monitor), seeds=SEEDS, **tokenizers)
    checked, entropies = 0, []
    for traj in trajectories:
        assert traj.root_cause is None and set(traj.sources) == {"student"}
        assert sum(len(s["tokens"]) for s in traj.steps) == len(traj.tokens)
        for step in traj.steps:
            start, tokens = step["start"], step["tokens"]
            logits = teacher_logits(teacher, traj.prompt + traj.tokens[: start + len(tokens)])
            before = len(traj.prompt) + start - 1  # the position whose output predicts the step's first token
            scored = tokens[:-1] if step["end"] == "eos" else tokens
            logp = logits[before : before + len(scored)].log_softmax(-1)
            expected = math.exp(float(logp[torch.arange(len(scored)), torch.tensor(scored)].mean()))
            assert math.isclose(step["oracle_value"], expected, rel_tol=1e-4)
            h = float(topk_entropy(logits[before : before + 1], top_k)[0])
            assert math.isclose(step["entropy"], h, rel_tol=1e-4, abs_tol=1e-6)
            entropies.append(h)
            assert math.isclose(step["boundary"], 1e-30 * math.exp(-h) if adaptive else 1e-30, rel_tol=1e-4)
            checked += 1
    assert checked >= 4 and any(s["end"] == "stop" for t in trajectories for s in t.steps)
    # not vacuous: the teacher spreads over more than 3 tokens, so the top 20 and the top 3 differ
    assert top_k == 3 or max(entropies) > math.log(3)


def test_a_step_ends_exactly_at_its_first_stop_string(student, teacher):
    for traj in rollout(student, teacher, PROMPTS, config(monitor=NEVER), seeds=SEEDS, tokenizer=TOKENIZER):
        for step in traj.steps:
            text = TOKENIZER.decode(step["tokens"])
            if step["end"] == "stop":
                assert STOP in text and STOP not in TOKENIZER.decode(step["tokens"][:-1])
            else:
                assert STOP not in text


def test_trim_stop_reads_the_separator_as_the_scripts(student, teacher):
    trimmed = rollout(
        student, teacher, PROMPTS, config(monitor=NEVER, trim_stop=True), seeds=SEEDS, tokenizer=TOKENIZER
    )
    stops = 0
    for traj in trimmed:
        text = TOKENIZER.decode(traj.tokens)
        assert STOP not in text  # every stop string was cut off
        for step, following in zip(traj.steps, traj.steps[1:]):
            if step["end"] != "stop":
                continue
            stops += 1
            # the step's text, then the separator, then the next step: context + step + "\n\n"
            end = step["start"] + len(step["tokens"])
            assert traj.tokens[end : following["start"]] == [BLANK_ID]
            assert not TOKENIZER.decode(step["tokens"]).endswith(".")
    assert stops >= 2


MANY_PROMPTS, MANY_SEEDS = PROMPTS * 4, list(range(12))


def planted_breach(student, teacher):
    """A boundary ε0 (θ = 0: a constant boundary) between the values of a run that never
    breaches, such that a row's first breach is at a step k whose root cause is an earlier step
    (the same draws up to it)."""
    never = rollout(student, teacher, MANY_PROMPTS, config(monitor=NEVER), seeds=MANY_SEEDS, tokenizer=TOKENIZER)
    for row, traj in enumerate(never):
        values = [s["oracle_value"] for s in traj.steps]
        for k in range(1, len(values)):
            if values[k] < min(values[:k]):
                epsilon0 = (values[k] + min(values[:k])) / 2
                if root_cause(values[: k + 1], [epsilon0] * (k + 1)) < k:
                    return row, epsilon0, values[: k + 1]
                break
    raise AssertionError("no run whose root cause precedes its breach: change the seeds")


def test_breach_rewinds_to_the_root_cause_and_the_teacher_writes_the_rest(student, teacher, monkeypatch):
    row, epsilon0, values = planted_breach(student, teacher)
    monitor = MonitorConfig(epsilon0=epsilon0, theta=0.0)
    rows = len(MANY_PROMPTS)
    student_pm = PagedModel(student, max_rows=rows, max_tokens=2048, block_size=4)
    teacher_pm = PagedModel(teacher, max_rows=rows, max_tokens=2048, block_size=4)
    check_invariant_every_round(monkeypatch, student_pm, teacher_pm)
    trajectories = rollout(
        student_pm, teacher_pm, MANY_PROMPTS, config(monitor=monitor), seeds=MANY_SEEDS, tokenizer=TOKENIZER
    )
    traj = trajectories[row]
    assert [s["oracle_value"] for s in traj.steps] == pytest.approx(values, rel=1e-5)
    expected = root_cause(values, [epsilon0] * len(values))
    assert traj.root_cause == expected < len(values) - 1
    start = traj.steps[expected]["start"]
    assert traj.interventions == [(start, len(traj.tokens))] and set(traj.sources[start:]) == {"teacher"}
    correction = traj.tokens[start:]
    assert len(correction) == max(8, 48 - start) or correction[-1] == TOKENIZER.eos_token_id
    assert correction == hf_greedy(teacher, traj.prompt + traj.tokens[:start], len(correction))


def test_step_skd_keeps_a_step_only_when_the_teacher_agrees(student):
    # The student's twin with an LM-head bias of -30 on "z": a step holding "z" has a tiny teacher
    # value, any other step the student's own probability at temperature 1, renormalised without "z".
    z = TOKENIZER.convert_tokens_to_ids("z")
    teacher = copy.deepcopy(student)
    head = torch.nn.Linear(teacher.lm_head.in_features, teacher.lm_head.out_features, device=DEVICE)
    with torch.no_grad():
        head.weight.copy_(teacher.lm_head.weight)
        head.bias.zero_()
        head.bias[z] = -30.0
    teacher.lm_head = head
    prompts = PROMPTS * 2
    trajectories = rollout(
        student,
        teacher,
        prompts,
        # γ 0.6: a sharper sampling distribution (0.8) than the teacher's (1) lowers V against it
        config("step_skd", student_sampling=SamplingConfig(temperature=0.8), step_skd_gamma=0.6),
        seeds=list(range(6)),
        tokenizer=TOKENIZER,
    )
    kept = rejected = 0
    for traj in trajectories:
        for step in traj.steps:
            if step["writer"] == "teacher":
                continue
            # the student's own value: its sampling distribution (temperature 0.8), stop token included
            logits = teacher_logits(student, traj.prompt + traj.tokens[: step["start"]] + step["tokens"])
            before = len(traj.prompt) + step["start"] - 1
            logp = (logits[before : before + len(step["tokens"])] / 0.8).log_softmax(-1)
            own = math.exp(float(logp[torch.arange(len(step["tokens"])), torch.tensor(step["tokens"])].mean()))
            assert math.isclose(step["student_value"], own, rel_tol=1e-4)
            accept = step["oracle_value"] > 0.6 * own
            if z in step["tokens"]:  # the planted disagreement is always caught
                assert not accept
            in_text = traj.tokens[step["start"] : step["start"] + len(step["tokens"])] == step["tokens"]
            assert in_text == accept
            kept += accept
            rejected += not accept
        for start, end in traj.interventions:  # each rejected step was rewritten by the teacher
            assert set(traj.sources[start:end]) == {"teacher"}
    assert kept >= 2 and rejected >= 2


def test_teacher_steps_is_the_teacher_writing_step_by_step(student, teacher):
    trajectories = rollout(None, teacher, PROMPTS, config("teacher_steps"), seeds=SEEDS, tokenizer=TOKENIZER)
    for traj in trajectories:
        assert set(traj.sources) == {"teacher"} and traj.steps
        assert all(s["writer"] == "teacher" and s["oracle_value"] is None for s in traj.steps)
        # greedy: the whole response is the teacher's greedy continuation, cut into steps
        assert traj.tokens == hf_greedy(teacher, traj.prompt, len(traj.tokens))


@pytest.mark.parametrize("mode", MODES)
def test_both_caches_stay_aligned_after_every_round_of_every_mode(student, teacher, mode, monkeypatch):
    options = dict(monitor=MonitorConfig(epsilon0=0.02, score="teacher_nll", rule="fixed", tau=4.0, warmup=0))
    if mode in ("step_motab", "step_skd", "teacher_steps"):
        options["trim_stop"] = mode != "step_skd"
    cfg = replace(config(mode, **options), intervention_len=3, max_interventions=2)
    student_pm = None if mode == "off_policy" else PagedModel(student, max_rows=3, max_tokens=512, block_size=4)
    teacher_pm = PagedModel(teacher, max_rows=3, max_tokens=512, block_size=4)
    checked = check_invariant_every_round(monkeypatch, student_pm, teacher_pm)
    trajectories = rollout(student_pm, teacher_pm, PROMPTS, cfg, seeds=SEEDS, tokenizer=TOKENIZER)
    assert checked and all(t.finish_reason for t in trajectories)
