"""The training loop on tiny random models: it learns, accumulation is exact, resume is exact."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from motab.config import ConfigError, MonitorConfig, RolloutConfig, TrainConfig
from motab.data import Problem
from motab.trainer import DistillationTrainer
from tests.tiny import tiny_qwen2


def tiny(seed, hidden, layers, tied=False):
    return tiny_qwen2(seed, hidden=hidden, layers=layers, tie_word_embeddings=tied).eval()


PROBLEMS = [Problem(f"p{i}", [1 + i, 2 + i, 3 + i], str(i), None) for i in range(6)]
ROLLOUT = RolloutConfig(
    max_new_tokens=12,
    draft_len=4,
    intervention_len=2,
    monitor=MonitorConfig(rule="fixed", tau=0.5, warmup=2),
)


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        steps=4,
        prompts_per_step=4,
        micro_batch=2,
        rollout=ROLLOUT,
        learning_rate=1e-3,
        warmup_steps=1,
        save_every=2,
    )
    return TrainConfig(**{**base, **kw})


def trainer(tmp_path, student=None, teacher=None, **kw):
    return DistillationTrainer(
        student or tiny(0, 32, 1), teacher or tiny(1, 64, 2), None, PROBLEMS, config(tmp_path, **kw)
    )


def fixed_batch_loss(run):
    """The distillation loss on one fixed set of problems' trajectories, without a gradient step."""
    grads_before = [p.grad for p in run.student.parameters()]
    problems = run.step_problems(0)
    run.student.train()
    from motab.engine import rollout
    from motab.losses import trajectory_targets

    torch.manual_seed(0)
    trajectories = rollout(
        *run.paged,
        [p.prompt_ids for p in problems],
        replace(ROLLOUT, mode="off_policy"),
        seeds=list(range(len(problems))),
        keep_teacher_hidden=True,
    )
    examples = [trajectory_targets(t.prompt, t.tokens, t.sources) for t in trajectories]
    loss = run._micro_step(examples, trajectories, normalizer=sum(len(t.tokens) for t in trajectories))
    run.optimizer.zero_grad(set_to_none=True)
    assert all(g is None for g in grads_before)
    return loss


def test_training_reduces_the_loss_and_logs(tmp_path):
    run = trainer(tmp_path, steps=12, learning_rate=3e-3, save_every=100)
    before = fixed_batch_loss(run)
    history = run.train(progress=False)
    after = fixed_batch_loss(run)
    assert after < 0.8 * before, (before, after)
    assert len(history) == 12 and all(h["loss_tokens"] > 0 for h in history)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 and '"interventions_per_100"' in lines[0]
    assert (tmp_path / "latest").read_text() == "checkpoint-12"
    assert (tmp_path / "checkpoint-12" / "student" / "model.safetensors").exists()


def test_accumulation_equals_one_big_batch(tmp_path):
    student, teacher = tiny(0, 32, 1), tiny(1, 64, 2)
    runs = [
        trainer(tmp_path / str(m), copy.deepcopy(student), teacher, steps=1, micro_batch=m, max_grad_norm=0.0)
        for m in (1, 2, 4)
    ]
    for run in runs:
        run.train(progress=False)
    reference = dict(runs[-1].student.named_parameters())
    for run in runs[:-1]:
        for name, p in run.student.named_parameters():
            torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_reused_teacher_hidden_states_equal_a_teacher_forward(tmp_path):
    """One step trained on the hidden states the rollout kept equals one trained on a fresh
    teacher forward (the rollout's states are the teacher's own, up to fp32 rounding)."""
    student, teacher = tiny(0, 32, 1), tiny(1, 64, 2)
    runs = [
        trainer(tmp_path / str(reuse), copy.deepcopy(student), teacher, steps=1, reuse_teacher_hidden=reuse)
        for reuse in (True, False)
    ]
    losses = [run.train(progress=False)[0]["loss"] for run in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    reference = dict(runs[1].student.named_parameters())
    for name, p in runs[0].student.named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_resume_equals_an_uninterrupted_run(tmp_path, tied):
    student, teacher = tiny(0, 32, 1, tied=tied), tiny(1, 64, 2)
    whole = trainer(tmp_path / "whole", copy.deepcopy(student), teacher)
    whole.train(progress=False)
    first = trainer(tmp_path / "split", copy.deepcopy(student), teacher, save_every=100)
    stop_after(first, 2)
    with pytest.raises(KeyboardInterrupt):  # the run is interrupted; Ctrl-C saves checkpoint-2
        first.train(progress=False)
    second = trainer(tmp_path / "split", copy.deepcopy(student), teacher)  # fresh weights, resumed below
    second.train(resume=True, progress=False)
    assert second.step == 4
    for (name, a), b in zip(whole.student.named_parameters(), second.student.parameters()):
        assert torch.equal(a, b), name


def stop_after(run, steps):
    """Makes ``run`` receive a Ctrl-C once it has finished ``steps`` steps."""
    original = run.train_step

    def step():
        if run.step >= steps:
            raise KeyboardInterrupt
        return original()

    run.train_step = step


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    run = trainer(tmp_path, save_every=100)
    stop_after(run, 1)
    with pytest.raises(KeyboardInterrupt):
        run.train(progress=False)
    assert (tmp_path / "latest").read_text() == "checkpoint-1"


def test_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        TrainConfig(prompts_per_step=6, micro_batch=4)
    with pytest.raises(ValueError, match="steps must be"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        trainer(tmp_path).train(resume=True, progress=False)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        other = tiny_qwen2(0, hidden=32, layers=1, vocab=70)
        trainer(tmp_path, teacher=other).train(progress=False)


def test_online_distillation_on_the_papers_step_rollouts(tmp_path):
    """``motab train --mode step_motab``: the online variant with the paper's score, boundary and
    rewind — the loss on the final trajectory (the kept student steps and the teacher's correction)."""
    from tests.tiny import stop_tokenizer

    tokenizer = stop_tokenizer()
    student = tiny_qwen2(0, hidden=32, layers=1, vocab=len(tokenizer)).eval()
    teacher = tiny_qwen2(1, hidden=64, layers=2, vocab=len(tokenizer)).eval()
    problems = [Problem(f"p{i}", tokenizer.encode(t), "0", None) for i, t in enumerate(["ab = 1", "x", "c d", "q + 2"])]
    rollout = RolloutConfig(mode="step_motab", max_new_tokens=16, max_step_tokens=6, min_correction_tokens=4)
    run = DistillationTrainer(student, teacher, tokenizer, problems, config(tmp_path, steps=2, rollout=rollout))
    before = copy.deepcopy(student.state_dict())
    run.train(progress=False)
    assert run.step == 2
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
