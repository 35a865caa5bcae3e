"""Run folders that cannot be lost (issue 13, item 1) and the trainer's feedback (item 3): a used
folder is refused without --resume/--overwrite, SIGTERM saves like Ctrl-C, a save is never cut short,
stale temporaries go, metrics are cut back on resume, save_total_limit, resume checks, the logged lr
and the loss curve."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from motab.cli import main
from motab.config import ConfigError, TrainConfig
from motab.runs import PartsOutput, checkpoints_to_delete, cut_metrics
from motab.trainer import DistillationTrainer, ResumeWarning
from tests.test_trainer import ROLLOUT, tiny, trainer
from tests.tiny import tiny_qwen2, word_tokenizer


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step run saved at each step (read only: copy it to change it)."""
    out = tmp_path_factory.mktemp("finished")
    trainer(out, steps=2, save_every=1).train(progress=False)
    return out


def resumed(tmp_path, finished, **kw) -> DistillationTrainer:
    """A trainer on a copy of the finished run."""
    shutil.copytree(finished, tmp_path / "run")
    return trainer(tmp_path / "run", **kw)


# --- used folders ----------------------------------------------------------------------------------


def test_a_used_folder_is_refused_and_left_as_it_was(finished):
    before = snapshot(finished)
    with pytest.raises(ConfigError, match="--resume .*--overwrite"):
        trainer(finished, steps=2, save_every=1).train(progress=False)
    assert snapshot(finished) == before


def test_overwrite_clears_the_runs_own_files_only(tmp_path, finished):
    run = resumed(tmp_path, finished, steps=1, save_every=1)
    (run.out / "notes.txt").write_text("mine")
    run.train(overwrite=True, progress=False)
    kept = sorted(p.name for p in run.out.iterdir())
    assert kept == ["checkpoint-1", "latest", "loss.png", "metrics.jsonl", "notes.txt"]
    assert len((run.out / "metrics.jsonl").read_text().splitlines()) == 1


def test_stale_temporaries_are_removed_at_start(tmp_path):
    (tmp_path / ".checkpoint-7.tmp").mkdir()
    (tmp_path / ".checkpoint-7.tmp" / "trainer_state.pt").write_text("half")
    trainer(tmp_path, steps=1, save_every=100).train(progress=False)
    assert not (tmp_path / ".checkpoint-7.tmp").exists() and (tmp_path / "latest").read_text() == "checkpoint-1"


def test_a_disk_full_save_keeps_the_last_checkpoint_and_resumes(tmp_path):
    run = trainer(tmp_path, steps=2, save_every=1)
    original = run._save_replicated

    def save(folder):  # the disk fills up half-way through step 2's checkpoint
        if run.step == 2:
            (folder / "trainer_state.pt").write_bytes(b"half")
            raise OSError(28, "No space left on device")
        original(folder)

    run._save_replicated = save
    with pytest.raises(OSError, match="No space left"):
        run.train(progress=False)
    assert (tmp_path / "latest").read_text() == "checkpoint-1" and run.last_checkpoint == tmp_path / "checkpoint-1"
    assert not (tmp_path / "checkpoint-2").exists()
    again = trainer(tmp_path, steps=2, save_every=1)
    again.train(resume=True, progress=False)
    assert (tmp_path / "latest").read_text() == "checkpoint-2" and not list(tmp_path.glob(".*.tmp"))
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# --- interrupts ------------------------------------------------------------------------------------


def test_sigterm_saves_and_resumes_to_an_uninterrupted_runs_parameters(tmp_path):
    student, teacher = tiny(0, 32, 1), tiny(1, 64, 2)
    whole = trainer(tmp_path / "whole", copy.deepcopy(student), teacher, steps=3, save_every=100)
    whole.train(progress=False)
    run = trainer(tmp_path / "split", copy.deepcopy(student), teacher, steps=3, save_every=100)
    original = run._rollout

    def rollout(*args):  # the scheduler's SIGTERM arrives in step 2's rollout
        if run.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    run._rollout = rollout
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run.train(progress=False)
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    assert (run.out / "latest").read_text() == "checkpoint-1" and run.last_checkpoint == run.out / "checkpoint-1"
    again = trainer(tmp_path / "split", copy.deepcopy(student), teacher, steps=3, save_every=100)
    again.train(resume=True, progress=False)
    for (name, a), b in zip(whole.student.named_parameters(), again.student.parameters()):
        assert torch.equal(a, b), name


def test_a_second_ctrl_c_waits_for_the_save(tmp_path):
    run = trainer(tmp_path, steps=1, save_every=100)
    original = run._save_replicated

    def save(folder):  # Ctrl-C pressed again while the checkpoint is written
        os.kill(os.getpid(), signal.SIGINT)
        original(folder)

    run._save_replicated = save
    with pytest.raises(KeyboardInterrupt):
        run.train(progress=False)
    assert (tmp_path / "latest").read_text() == "checkpoint-1" and (tmp_path / "checkpoint-1" / "student").is_dir()
    assert not list(tmp_path.glob(".*.tmp")) and run.last_checkpoint == tmp_path / "checkpoint-1"


# --- resume ----------------------------------------------------------------------------------------


def test_resume_cuts_the_metrics_back_to_the_checkpoint(tmp_path, finished):
    run = resumed(tmp_path, finished, steps=2, save_every=1)
    metrics = run.out / "metrics.jsonl"
    first = metrics.read_text().splitlines()[0]
    (run.out / "latest").write_text("checkpoint-1")  # as a kill after step 2's line, before its save
    run.train(resume=True, progress=False)
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2] and lines[0] == first


def test_cut_metrics_drops_later_steps_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    cut_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and not list(tmp_path.glob(".*"))


def test_resume_with_another_student_names_the_parameter(tmp_path, finished):
    run = resumed(tmp_path, finished, student=tiny(0, 48, 1), steps=2, save_every=1)
    with pytest.raises(ConfigError) as error:
        run.train(resume=True, progress=False)
    message = str(error.value)
    assert "checkpoint-2 does not fit the student" in message and "is [64, 32] there and [64, 48]" in message
    assert "\n" not in message


def test_resume_warns_of_every_changed_setting_once(tmp_path, finished):
    run = resumed(tmp_path, finished, steps=3, save_every=1, learning_rate=2e-3)
    with pytest.warns(ResumeWarning) as caught:
        run.train(resume=True, progress=False)
    messages = sorted(str(w.message).split(": ", 1)[1] for w in caught)
    assert messages == [
        "train.learning_rate changed from 0.001 in the checkpoint to 0.002",
        "train.steps changed from 2 in the checkpoint to 3",
    ]


def test_latest_pointing_at_a_missing_folder_is_named(tmp_path, finished):
    run = resumed(tmp_path, finished, steps=2, save_every=1)
    shutil.rmtree(run.out / "checkpoint-2")
    with pytest.raises(ConfigError, match="points at 'checkpoint-2', which is not a checkpoint folder"):
        run.train(resume=True, progress=False)


# --- checkpoints kept, lr and the curve ------------------------------------------------------------


def test_save_total_limit_keeps_the_newest(tmp_path):
    trainer(tmp_path, steps=3, save_every=1, save_total_limit=2).train(progress=False)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(ConfigError, match="save_total_limit"):
        TrainConfig(save_total_limit=0)


def test_save_total_limit_never_deletes_the_latest(tmp_path):
    for step in range(1, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "latest").write_text("checkpoint-2")
    assert [p.name for p in checkpoints_to_delete(tmp_path, 1)] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]


def test_the_logged_lr_is_the_one_the_step_used(tmp_path):
    run = trainer(tmp_path, steps=3, warmup_steps=1, save_every=100)
    history = run.train(progress=False)
    used = [1e-3 * run._schedule(step) for step in range(3)]  # LambdaLR: peak × the step's factor
    assert [h["lr"] for h in history] == pytest.approx(used) and used[0] == pytest.approx(0.5e-3)


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header.startswith(b"\x89PNG")
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_a_loss_curve_is_drawn_at_each_save(tmp_path):
    run = trainer(tmp_path, steps=2, save_every=1)
    original, drawn = run._draw_curves, []

    def draw():
        original()
        drawn.append(len(plotted_steps(tmp_path)))

    run._draw_curves = draw
    run.train(progress=False)
    assert drawn == [1, 2]
    # a monitored mode: the interventions per 100 tokens beside the loss, two panels side by side
    width, height = png_size(tmp_path / "loss.png")
    assert width > 2.5 * height


def plotted_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_unmonitored_runs_curve_is_the_loss_alone(tmp_path):
    trainer(tmp_path, steps=1, save_every=1, rollout=replace(ROLLOUT, mode="on_policy")).train(progress=False)
    width, height = png_size(tmp_path / "loss.png")
    assert width < 2 * height


# --- the CLI: one line, exit 2, nothing touched ----------------------------------------------------

WORDS = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(["student", "teacher"]):
        tiny_qwen2(seed, hidden=32, layers=1).save_pretrained(root / name)
        word_tokenizer(WORDS, "<unk>", eos_token="<eos>").save_pretrained(root / name)
    (root / "data.jsonl").write_text(json.dumps({"question": "w1 w2", "answer": "1"}) + "\n")
    return ["--student", str(root / "student"), "--teacher", str(root / "teacher"), "--data", str(root / "data.jsonl")]


def refused(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def used_folder(root: Path) -> Path:
    out = root / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "latest").write_text("checkpoint-1")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


def test_cli_refuses_a_used_folder(tmp_path, models, capsys):
    out = used_folder(tmp_path)
    before = snapshot(out)
    line = refused(["train", *models, "--output-dir", str(out)], capsys)
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert snapshot(out) == before
    line = refused(["train", *models, "--output-dir", str(out), "--resume", "--overwrite"], capsys)
    assert "exclude each other" in line


def test_cli_sigterm_saves_and_exits_as_the_signal_would(tmp_path, models, capsys, monkeypatch):
    rollout = DistillationTrainer._rollout

    def rollout_then_sigterm(self, *args):  # the scheduler's SIGTERM arrives in step 2's rollout
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return rollout(self, *args)

    monkeypatch.setattr(DistillationTrainer, "_rollout", rollout_then_sigterm)
    out = tmp_path / "run"
    argv = ["train", *models, "--output-dir", str(out), "--steps", "3", "--set", "train.prompts_per_step=1"]
    argv += ["--set", "train.micro_batch=1", "--set", "rollout.max_new_tokens=4"]
    assert main(argv) == 128 + signal.SIGTERM
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1] == f"motab train: interrupted: saved {out / 'checkpoint-1'}; continue with --resume"
    assert (out / "latest").read_text() == "checkpoint-1"


def test_cli_names_a_missing_latest_target(tmp_path, models, capsys):
    out = used_folder(tmp_path)
    shutil.rmtree(out / "checkpoint-1")
    line = refused(["train", *models, "--output-dir", str(out), "--resume"], capsys)
    assert "points at 'checkpoint-1', which is not a checkpoint folder" in line


def test_cli_synthesize_refuses_a_used_output(tmp_path, models, capsys):
    out = tmp_path / "records.jsonl"
    out.write_text('{"id": 0}\n')
    line = refused(["synthesize", *models, "--out", str(out)], capsys)
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert out.read_text() == '{"id": 0}\n'


def test_synthesize_overwrite_removes_the_output_and_its_parts(tmp_path):
    out, parts = tmp_path / "records.jsonl", tmp_path / "records.jsonl.parts"
    parts.mkdir()
    (parts / "part-0.jsonl").write_text('{"id": 0}\n')
    out.write_text('{"id": 0}\n')
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "records.jsonl.run.json").write_text("{}")
    PartsOutput(out).prepare({"questions": 1}, resume=False, overwrite=True)
    assert not out.exists() and list(parts.iterdir()) == []
    assert json.loads((tmp_path / "records.jsonl.run.json").read_text())["settings"] == {"questions": 1}
    assert (tmp_path / "notes.txt").exists()
