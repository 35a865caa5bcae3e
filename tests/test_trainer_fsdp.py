"""FSDP2 training over gloo on CPU: 2 ranks compute the same steps as 1 process, a stopped run
resumes from its sharded checkpoint to the same parameters bit for bit, and every checkpoint holds
the student as a plain Hugging Face folder."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from motab.config import ConfigError, TrainConfig, build_configs
from motab.trainer import DistillationTrainer
from tests.test_trainer import PROBLEMS, ROLLOUT, config, stop_after, tiny

# One token in 8 ends a row, so the ranks' rollouts run different numbers of student forwards (a
# collective inside a forward would leave one rank waiting: the timeout turns that into a failure).
ROLLOUT_WITH_EOS = replace(ROLLOUT, eos_token_ids=tuple(range(0, 64, 8)))
STEPS = dict(steps=2, prompts_per_step=4, max_grad_norm=1.0, save_every=100, rollout=ROLLOUT_WITH_EOS)
TIMEOUT = timedelta(seconds=180)


def _fsdp_trainer(out_dir, tied: bool, **kw) -> DistillationTrainer:
    """2 prompts a rank in micro-batches of 1: the first backward runs without gradient sync."""
    settings = dict(STEPS, micro_batch=1, parallel="fsdp") | kw
    return DistillationTrainer(tiny(0, 32, 1, tied=tied), tiny(1, 64, 2), None, PROBLEMS, config(out_dir, **settings))


def _spawn(worker, tmp_path, *args) -> None:
    mp.spawn(worker, args=(2, str(tmp_path / "init"), *args), nprocs=2, join=True)


def _join(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT)


def _leave() -> None:
    """Ends a worker that succeeded, skipping the interpreter's teardown. Gloo's worker threads free
    a finished collective's tensors on their own, and a process tearing down meanwhile aborts
    ("terminate called without an active exception": about 1 run in 8 here, and still seen after a
    final barrier), which the spawning test would report as a failure of the training under test."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_worker(rank: int, world: int, init_file: str, out_dir: str, result: str, tied: bool) -> None:
    _join(rank, world, init_file)
    try:
        run = _fsdp_trainer(out_dir, tied)
        forwards = _count_rollout_forwards(run)
        run.train(progress=False)
        state = run.full_student_state()  # a collective: every rank gathers, rank 0 receives
        counts = [None] * world
        dist.all_gather_object(counts, forwards)
        if rank == 0:
            torch.save(dict(state=state, rollout_forwards=counts), result)
        _leave()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _count_rollout_forwards(run: DistillationTrainer) -> list[int]:
    """Counts, step by step, the forwards of the student's first layer without a gradient."""
    counts = []
    original = run.train_step

    def step():
        counts.append(0)
        return original()

    def count(*_):
        counts[-1] += not torch.is_grad_enabled()

    run.train_step = step
    run.student.get_decoder().layers[0].register_forward_pre_hook(count)
    return counts


def _resume_worker(rank: int, world: int, init_file: str, out_dir: str, result: str) -> None:
    _join(rank, world, init_file)
    try:
        whole = _fsdp_trainer(f"{out_dir}/whole", tied=True)
        whole.train(progress=False)
        first = _fsdp_trainer(f"{out_dir}/split", tied=True)
        stop_after(first, 1)
        try:  # Ctrl-C after step 1 on every rank: each writes its shards of checkpoint-1
            first.train(progress=False)
        except KeyboardInterrupt:
            pass
        second = _fsdp_trainer(f"{out_dir}/split", tied=True)  # fresh weights, resumed below
        second.train(resume=True, progress=False)
        states = [whole.full_student_state(), second.full_student_state()]
        if rank == 0:
            torch.save(dict(whole=states[0], resumed=states[1], step=second.step), result)
        _leave()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True])
def test_two_sharded_ranks_equal_one_process_and_save_a_plain_student(tmp_path, tied):
    result = tmp_path / "fsdp.pt"
    _spawn(_train_worker, tmp_path, str(tmp_path / "fsdp"), str(result), tied)
    single = tiny(0, 32, 1, tied=tied)
    run = DistillationTrainer(single, tiny(1, 64, 2), None, PROBLEMS, config(tmp_path / "one", micro_batch=2, **STEPS))
    run.train(progress=False)
    assert not torch.equal(single.lm_head.weight, tiny(0, 32, 1, tied=tied).lm_head.weight)  # the head trained

    # Same math, other summation order (each rank's micro-batch sum, then the reduce-scatter's sum,
    # and the clipping norm from per-shard norms, vs one process's running sum): fp32 rounding,
    # through 2 AdamW steps at lr 1e-3. Measured: at most 9e-8 absolute on weights of ~0.1-1, so the
    # DDP test's tolerance, 1e-5 relative + 1e-6 absolute, has a 10× margin; the absolute term
    # covers elements near 0, where the relative difference reaches 6e-4.
    saved = torch.load(result)
    forwards = saved["rollout_forwards"]
    assert forwards[0] != forwards[1], f"both ranks' rollouts ran {forwards[0]} forwards: choose other EOS ids"
    sharded = saved["state"]
    assert sharded.keys() == single.state_dict().keys()
    for name, value in single.state_dict().items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6, msg=name)

    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    assert (tmp_path / "fsdp" / "latest").read_text() == "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert (checkpoint / "sharded" / ".metadata").exists()
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint / "student")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, sharded[name]), name


def test_a_stopped_sharded_run_resumes_to_the_same_parameters(tmp_path):
    result = tmp_path / "resume.pt"
    _spawn(_resume_worker, tmp_path, str(tmp_path / "runs"), str(result))
    states = torch.load(result)
    assert states["step"] == 2
    assert (tmp_path / "runs" / "split" / "checkpoint-1" / "sharded").is_dir()
    for name, value in states["whole"].items():
        assert torch.equal(states["resumed"][name], value), name


def test_parallel_names_its_choices():
    with pytest.raises(ValueError, match="parallel: unknown parallel mode 'zero3'; expected one of ddp, fsdp"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ConfigError, match="train.parallel: unknown parallel mode 'zero3'"):
        build_configs({"train": {"parallel": "zero3"}})
