"""Data-parallel training over gloo on CPU: 2 ranks compute the same steps as 1 process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from motab.trainer import DistillationTrainer
from tests.test_trainer import PROBLEMS, config, tiny

STEPS = dict(steps=2, prompts_per_step=4, max_grad_norm=1.0, save_every=100)


def _worker(rank: int, world: int, init_file: str, out_dir: str, result: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student = tiny(0, 32, 1)
        run = DistillationTrainer(student, tiny(1, 64, 2), None, PROBLEMS, config(out_dir, micro_batch=1, **STEPS))
        run.train(progress=False)
        if rank == 0:
            torch.save(student.state_dict(), result)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    result = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), str(result)), nprocs=2, join=True)
    single = tiny(0, 32, 1)
    DistillationTrainer(single, tiny(1, 64, 2), None, PROBLEMS, config(tmp_path / "one", micro_batch=2, **STEPS)).train(
        progress=False
    )
    parallel = torch.load(result)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(parallel[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "ddp" / "latest").read_text() == "checkpoint-2"
