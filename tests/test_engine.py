"""The rollout engine on tiny random models. Disagreements are planted in the teacher's weights
(its LM-head row for one token), never by patching scores."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from motab import engine as engine_module
from motab.config import RULES, MonitorConfig, RolloutConfig, SamplingConfig
from motab.engine import rollout
from motab.engine.token import TokenRounds
from motab.models import PagedModel
from motab_kernels import OutOfBlocksError
from tests.engine_checks import check_invariant_every_round
from tests.tiny import hf_greedy, tiny_qwen2, word_tokenizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GREEDY = SamplingConfig(temperature=0.0)
# The teacher's surprise at the student's token: large exactly where the student writes the
# token whose LM-head row the teacher has wrong, near the student's own surprise elsewhere.
NLL = MonitorConfig(score="teacher_nll", warmup=0)
PROMPTS = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15]]


def model(seed, hidden=64, vocab=101):
    return (
        tiny_qwen2(seed, hidden=hidden, vocab=vocab, initializer_range=0.4, tie_word_embeddings=False).to(DEVICE).eval()
    )


def planted_teacher(student, token, hidden, strength=30.0):
    """The student's twin, except that its LM-head row for ``token`` is pushed away from the
    final hidden state ``hidden``: the teacher rules the token out where the student writes it."""
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.lm_head.weight[token] -= strength * hidden / hidden.square().sum()
    return teacher


@pytest.fixture(scope="module")
def student():
    return model(0)


def test_infinite_boundary_is_on_policy(student):
    teacher = model(1)
    sampling = dict(student_sampling=SamplingConfig(temperature=1.0, top_k=40), max_new_tokens=24, draft_len=5)
    on_policy = rollout(student, teacher, PROMPTS, RolloutConfig(mode="on_policy", **sampling))
    never = MonitorConfig(rule="fixed", tau=math.inf, warmup=0)
    motab = rollout(student, teacher, PROMPTS, RolloutConfig(mode="motab", monitor=never, **sampling))
    for a, b in zip(on_policy, motab):
        assert a.tokens == b.tokens and not b.interventions and b.counters["backtracks"] == 0
    assert len({t for traj in motab for t in traj.tokens}) > 10


@pytest.mark.parametrize("rule", RULES)
def test_teacher_equal_to_student_never_intervenes(student, rule):
    twin = copy.deepcopy(student)
    config = RolloutConfig(monitor=MonitorConfig(rule=rule, warmup=0), max_new_tokens=24, draft_len=4)
    for trajectory in rollout(student, twin, PROMPTS, config):
        assert not trajectory.interventions and set(trajectory.sources) == {"student"}
        assert max(trajectory.scores) < 1e-4


def planted_case(student, prompt, earliest=3):
    """The student's greedy continuation, a position p, the token X it writes there (its first
    occurrence) and a teacher planted against X at p: p is chosen where the planted teacher's
    surprise at the student's tokens stands out most from the positions before it."""
    greedy = hf_greedy(student, prompt, 30)
    sequence = torch.tensor([prompt + greedy], device=DEVICE)
    with torch.no_grad():
        hidden = student.model(sequence).last_hidden_state[0, len(prompt) - 1 :]
    targets = torch.tensor(greedy, device=DEVICE)

    def surprise(teacher):
        with torch.no_grad():
            logprobs = teacher(sequence).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        return -logprobs[torch.arange(len(greedy), device=DEVICE), targets]

    best = None
    for p in range(earliest, 20):
        if greedy[p] in greedy[:p]:
            continue
        teacher = planted_teacher(student, greedy[p], hidden[p])
        nll = surprise(teacher)
        contrast = float(nll[p] / nll[:p].max())
        if best is None or contrast > best[0]:
            best = (contrast, p, teacher)
    _, p, teacher = best
    return greedy, greedy[p], p, teacher


def on_policy_scores(student, teacher, prompt, n):
    config = RolloutConfig(mode="on_policy", student_sampling=GREEDY, monitor=NLL, max_new_tokens=n)
    return rollout(student, teacher, [prompt], config)[0].scores


def test_token_level_backtrack_and_intervention(student, monkeypatch):
    prompt = PROMPTS[0]
    greedy, token, p, teacher = planted_case(student, prompt)
    scores = on_policy_scores(student, teacher, prompt, p + 1)
    assert scores[p] > 3 * max(scores[:p])  # the plant shows up where the student writes the token
    tau = (scores[p] + max(scores[:p])) / 2
    config = RolloutConfig(
        mode="motab",
        monitor=replace(NLL, rule="fixed", tau=tau),
        draft_len=4,
        intervention_len=3,
        max_interventions=1,
        max_new_tokens=p + 8,
        student_sampling=GREEDY,
        teacher_sampling=GREEDY,
    )
    student_pm = PagedModel(student, max_rows=1, max_tokens=256, block_size=4)
    teacher_pm = PagedModel(teacher, max_rows=1, max_tokens=256, block_size=4)
    checked = check_invariant_every_round(monkeypatch, student_pm, teacher_pm)
    traj = rollout(student_pm, teacher_pm, [prompt], config)[0]
    assert checked
    assert traj.tokens[:p] == greedy[:p] and traj.sources[:p] == ["student"] * p
    assert traj.discarded[0]["position"] == p and traj.discarded[0]["tokens"][0] == token
    assert traj.interventions == [(p, p + 3)]
    assert traj.tokens[p : p + 3] == hf_greedy(teacher, prompt + greedy[:p], 3)
    # the student resumes from the corrected prefix
    resumed = hf_greedy(student, prompt + traj.tokens[: p + 3], 1)
    assert traj.sources[p + 3] == "student" and traj.tokens[p + 3] == resumed[0]
    json.dumps(traj.to_dict())


def test_step_level_backtrack_lands_after_the_delimiter(student):
    prompt = PROMPTS[2]
    greedy, token, p, teacher = planted_case(student, prompt, earliest=5)
    delimiter = next(t for t in greedy[1:p] if t != token)
    q = max(i for i in range(p) if greedy[i] == delimiter)
    scores = on_policy_scores(student, teacher, prompt, p + 1)
    assert scores[p] > 3 * max(scores[:p])
    tau = (scores[p] + max(scores[:p])) / 2
    config = RolloutConfig(
        mode="motab",
        monitor=replace(NLL, rule="fixed", tau=tau),
        draft_len=3,
        backtrack="step",
        delimiter_token_ids=(delimiter,),
        intervention_len=2,
        max_interventions=1,
        max_new_tokens=p + 6,
        student_sampling=GREEDY,
        teacher_sampling=GREEDY,
    )
    traj = rollout(student, teacher, [prompt], config)[0]
    assert traj.tokens[: q + 1] == greedy[: q + 1] and traj.tokens[q] == delimiter
    assert traj.discarded[0]["position"] == q + 1
    assert traj.discarded[0]["tokens"][: p - q - 1] == greedy[q + 1 : p]
    assert traj.interventions[0][0] == q + 1
    assert traj.tokens[q + 1 : q + 3] == hf_greedy(teacher, prompt + greedy[: q + 1], 2)


def test_skd_replaces_one_token_and_adaswitch_hands_over(student):
    prompt = PROMPTS[0]
    greedy, token, p, teacher = planted_case(student, prompt)
    common = dict(student_sampling=GREEDY, teacher_sampling=GREEDY, max_new_tokens=p + 6, draft_len=4)
    skd = rollout(student, teacher, [prompt], RolloutConfig(mode="skd", monitor=MonitorConfig(skd_top_k=5), **common))[
        0
    ]
    assert skd.tokens[:p] == greedy[:p] and skd.sources[p] == "teacher"
    assert skd.tokens[p] == hf_greedy(teacher, prompt + greedy[:p], 1)[0] and skd.sources[p + 1] == "student"
    switch_early = MonitorConfig(warmup=0, tau_min=0.0, window_factor=2.0)
    ada = rollout(student, teacher, [prompt], RolloutConfig(mode="adaswitch", monitor=switch_early, **common))[0]
    switch = ada.sources.index("teacher")
    assert switch <= p and set(ada.sources[switch:]) == {"teacher"} and not ada.interventions
    assert ada.tokens[switch:] == hf_greedy(teacher, prompt + ada.tokens[:switch], len(ada.tokens) - switch)


def test_off_policy_is_the_teacher_sampling_alone(student):
    teacher = model(2)
    config = RolloutConfig(mode="off_policy", teacher_sampling=GREEDY, max_new_tokens=12, draft_len=5)
    for prompt, traj in zip(PROMPTS, rollout(student, teacher, PROMPTS, config)):
        assert traj.tokens == hf_greedy(teacher, prompt, 12) and set(traj.sources) == {"teacher"}


def test_a_row_does_not_depend_on_the_rest_of_the_batch(student):
    teacher = model(3)
    config = RolloutConfig(
        monitor=MonitorConfig(rule="fixed", tau=0.8, warmup=2), max_new_tokens=20, draft_len=4, intervention_len=2
    )
    batch = rollout(student, teacher, PROMPTS, config, seeds=[7, 8, 9])
    alone = rollout(student, teacher, [PROMPTS[1]], config, seeds=[8])
    assert batch[1].tokens == alone[0].tokens and batch[1].sources == alone[0].sources
    assert any(t.interventions for t in batch)  # the comparison covers backtracking too


def test_bad_configs_and_inputs(student):
    with pytest.raises(ValueError, match="unknown rollout mode"):
        RolloutConfig(mode="gkd")
    with pytest.raises(ValueError, match="draft_len"):
        RolloutConfig(draft_len=0)
    with pytest.raises(ValueError, match="at least one token"):
        rollout(student, student, [[]])
    with pytest.raises(ValueError, match="1 seeds for 3 prompts: pass one seed per prompt"):
        rollout(student, student, PROMPTS, seeds=[0])
    other = model(6, hidden=32, vocab=103)
    with pytest.raises(ValueError, match="vocabulary mismatch: the student's LM head has 101 rows, the teacher's 103"):
        rollout(student, other, PROMPTS)


def test_budget_exhausted_means_unmonitored(student):
    prompt = PROMPTS[0]
    greedy, _, p, teacher = planted_case(student, prompt)
    scores = on_policy_scores(student, teacher, prompt, p + 1)
    tau = (scores[p] + max(scores[:p])) / 2
    config = RolloutConfig(
        monitor=replace(NLL, rule="fixed", tau=tau),
        max_interventions=0,
        max_new_tokens=p + 4,
        student_sampling=GREEDY,
        draft_len=4,
    )
    traj = rollout(student, teacher, [prompt], config)[0]
    assert traj.tokens == greedy[: p + 4] and not traj.interventions and traj.counters["backtracks"] == 0
    assert traj.scores[p] == pytest.approx(scores[p], rel=1e-4)  # still scored, never acted on


def test_step_intervention_stops_at_the_teacher_delimiter(student):
    prompt = PROMPTS[0]
    greedy, _, p, teacher = planted_case(student, prompt)
    teacher_text = hf_greedy(teacher, prompt + greedy[:p], 12)
    delimiter = teacher_text[2]
    scores = on_policy_scores(student, teacher, prompt, p + 1)
    tau = (scores[p] + max(scores[:p])) / 2
    config = RolloutConfig(
        monitor=replace(NLL, rule="fixed", tau=tau),
        intervention="step",
        intervention_len=10,
        delimiter_token_ids=(delimiter,),
        max_interventions=1,
        max_new_tokens=p + 12,
        student_sampling=GREEDY,
        teacher_sampling=GREEDY,
    )
    traj = rollout(student, teacher, [prompt], config)[0]
    end = teacher_text.index(delimiter) + 1
    assert traj.interventions[0] == (p, p + end) and traj.tokens[p : p + end] == teacher_text[:end]


def test_eos_and_length_finish_rows(student):
    teacher = model(4)
    free = rollout(
        student, teacher, PROMPTS, RolloutConfig(mode="on_policy", student_sampling=GREEDY, max_new_tokens=10)
    )
    eos = free[0].tokens[3]
    stopped = rollout(
        student,
        teacher,
        PROMPTS,
        RolloutConfig(mode="on_policy", student_sampling=GREEDY, max_new_tokens=10, eos_token_ids=(eos,)),
    )
    first = stopped[0]
    assert first.tokens == free[0].tokens[: free[0].tokens.index(eos) + 1] and first.finish_reason == "eos"
    assert all(t.finish_reason in ("eos", "length") for t in stopped)
    assert all(len(t.tokens) == 10 for t in stopped if t.finish_reason == "length")


def test_padded_lm_heads_sample_within_the_tokenizer_vocabulary(student):
    padded = model(5, vocab=128)  # an LM head padded past the 101-token vocabulary
    config = RolloutConfig(vocab_size=101, max_new_tokens=16, monitor=MonitorConfig(rule="fixed", tau=1.0, warmup=0))
    for traj in rollout(student, padded, PROMPTS, config):
        assert max(traj.tokens) < 101 and len(traj.tokens) == 16


def test_tokenizers_must_agree(student):
    def words(size):
        return word_tokenizer([f"t{i}" for i in range(size)], "t0")

    with pytest.raises(ValueError, match=r"tokenizers differ \(vocabularies of 101 and 99 tokens\)"):
        rollout(student, student, PROMPTS, tokenizer=words(101), teacher_tokenizer=words(99))


def test_sampling_filters_seeds_and_distribution():
    sample = engine_module.sample_tokens
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]] * 3, device=DEVICE)
    assert sample(logits, SamplingConfig(top_k=1), [0, 1, 2], [0, 0, 0]).tolist() == [1, 1, 1]
    assert sample(logits, SamplingConfig(top_p=0.01), [0, 1, 2], [5, 6, 7]).tolist() == [1, 1, 1]
    assert sample(logits, SamplingConfig(temperature=0.0), [0, 1, 2], [0, 0, 0]).tolist() == [1, 1, 1]
    top2 = sample(logits[:1].expand(400, 4), SamplingConfig(top_k=2), list(range(400)), [0] * 400)
    assert set(top2.tolist()) == {1, 2}
    # a row's draw depends on its seed and counter only, not on the other rows or its place among
    # them: 48 draws from 64 equally likely tokens, each alone and inside a shuffled batch of other
    # rows (an RNG that ignored this would match by chance with probability 64^-48)
    flat = torch.zeros(1, 64, device=DEVICE)
    seeds, counters = list(range(100, 148)), [3 * i for i in range(48)]
    alone = [int(sample(flat, SamplingConfig(), [s], [c])[0]) for s, c in zip(seeds, counters)]
    assert len(set(alone)) > 20  # the draws do vary with the seed and counter
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0)).tolist()
    batch_logits = torch.randn(96, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    batch_seeds, batch_counters = list(range(96)), [7] * 96
    for row, place in enumerate(order[:48]):
        batch_logits[place], batch_seeds[place], batch_counters[place] = flat[0], seeds[row], counters[row]
    together = sample(batch_logits, SamplingConfig(), batch_seeds, batch_counters).tolist()
    assert [together[place] for place in order[:48]] == alone
    # and a row's next draw (counter + 1) is another draw, not the same one again
    again = [int(sample(flat, SamplingConfig(), [s], [c + 1])[0]) for s, c in zip(seeds, counters)]
    assert sum(a == b for a, b in zip(alone, again)) < 8
    # frequencies follow softmax(logits / T) (20k draws: 4 standard errors)
    n, temperature = 20000, 1.5
    draws = sample(logits[:1].expand(n, 4), SamplingConfig(temperature=temperature), [7] * n, list(range(n)))
    frequency = torch.bincount(draws, minlength=4).double() / n
    expected = torch.softmax(logits[0].double() / temperature, -1)
    assert torch.all((frequency - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-9)


def test_fixed_rule_decided_by_the_op_equals_the_scan(student, monkeypatch):
    teacher = model(7)
    config = RolloutConfig(
        monitor=MonitorConfig(rule="fixed", tau=0.6, warmup=3), max_new_tokens=24, draft_len=5, intervention_len=2
    )
    by_op_calls = []
    original = TokenRounds._decided_by_op
    monkeypatch.setattr(
        TokenRounds,
        "_decided_by_op",
        lambda self, row: by_op_calls.append(original(self, row)) or by_op_calls[-1],
    )
    with_op = rollout(student, teacher, PROMPTS, config)
    assert any(by_op_calls) and any(t.interventions for t in with_op)
    monkeypatch.setattr(TokenRounds, "_decided_by_op", lambda self, row: False)
    with_scan = rollout(student, teacher, PROMPTS, config)
    for a, b in zip(with_op, with_scan):
        assert a.tokens == b.tokens and a.sources == b.sources and a.interventions == b.interventions


@pytest.mark.parametrize("mode", ["motab", "off_policy"])
def test_kept_teacher_hidden_states_are_the_teachers_own(student, mode):
    prompt = PROMPTS[0]
    greedy, _, p, teacher = planted_case(student, prompt)
    scores = on_policy_scores(student, teacher, prompt, p + 1)
    config = RolloutConfig(
        mode=mode,
        monitor=replace(NLL, rule="fixed", tau=(scores[p] + max(scores[:p])) / 2),
        backtrack="step",
        delimiter_token_ids=(greedy[1],),
        max_new_tokens=p + 6,
        draft_len=4,
        intervention_len=2,
    )
    traj = rollout(student, teacher, [prompt], config, keep_teacher_hidden=True)[0]
    assert traj.teacher_hidden.shape == (len(traj.tokens), 64)
    sequence = torch.tensor([prompt + traj.tokens], device=DEVICE)
    with torch.no_grad():
        fresh = teacher.model(sequence).last_hidden_state[0, len(prompt) - 1 : -1]
    torch.testing.assert_close(traj.teacher_hidden, fresh, rtol=1e-4, atol=1e-4)
    assert "teacher_hidden" not in traj.to_dict()


def test_a_prompt_longer_than_the_pool_is_refused_before_anything_starts(student):
    small = PagedModel(model(8), max_rows=3, max_tokens=24, block_size=4)
    with pytest.raises(OutOfBlocksError, match="prompt of 30 tokens.*pool holds 36.*nothing was started"):
        rollout(student, small, [list(range(1, 31))], RolloutConfig(max_new_tokens=8))
    assert small.lengths([0, 1, 2]) == [0, 0, 0]


def test_a_row_that_outgrows_the_whole_pool_stops_the_rollout_in_one_line_with_the_caches_empty(student):
    small = PagedModel(model(8), max_rows=3, max_tokens=40, block_size=4)
    with pytest.raises(OutOfBlocksError, match=r"KV pool too small: it holds 52 tokens and row \d needs 5\d"):
        rollout(student, small, PROMPTS, RolloutConfig(max_new_tokens=64))
    assert small.lengths([0, 1, 2]) == [0, 0, 0] and small.num_free_blocks == small.cache.num_blocks


def test_stop_strings_end_a_row(student):
    tokenizer = word_tokenizer([f"<{i}>" for i in range(101)], "<0>")
    teacher = model(9)
    base = RolloutConfig(mode="on_policy", student_sampling=GREEDY, max_new_tokens=12)
    free = rollout(student, teacher, PROMPTS[:1], base, tokenizer=tokenizer)[0]
    stop = free.tokens[4]
    stopped = rollout(student, teacher, PROMPTS[:1], replace(base, stop_strings=(f"<{stop}>",)), tokenizer=tokenizer)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free.tokens[: free.tokens.index(stop) + 1]
