"""The promises every command keeps (README, "What every command promises"), each driven through the
command line as a user would meet it: a used output is refused unless --resume or --overwrite, and
nothing in it changes; Ctrl-C and SIGTERM keep what is done, say so in one line and exit 130 or
143, and --resume continues to what an uninterrupted run writes; temporaries are gone after
success; a model folder, data file or option that cannot work is one line before anything loads;
settings that quietly do otherwise than asked warn."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest

import motab.cli
from motab import engine as engine_module
from motab.cli import main
from tests.test_cli_errors import refused
from tests.test_synthesis import assert_same_records


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (or the file itself) with its bytes."""
    folder = Path(folder)
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupted(argv: list[str], capsys, code: int = 130) -> str:
    """The one line an interrupted command prints; fails unless it exits ``code`` without a traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("motab ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """``motab prepare`` with an untrained student (``--warm-steps 0``, seconds): the splits, the
    shipped teacher and the student."""
    root = tmp_path_factory.mktemp("contract") / "toy"
    assert main(["prepare", str(root), "--warm-steps", "0", "--train", "12"]) == 0
    return root


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_trajectories(a: list[dict], b: list[dict]) -> None:
    """Equal trajectories: tokens, writers and texts exactly; scores and boundaries to float32
    rounding, which differs in the last bits with the batch a row shares."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        floats = ("scores", "boundaries")
        assert {k: v for k, v in x.items() if k not in floats} == {k: v for k, v in y.items() if k not in floats}
        for key in floats:
            assert [v is None for v in x[key]] == [v is None for v in y[key]]
            assert [v for v in x[key] if v is not None] == pytest.approx([v for v in y[key] if v is not None], rel=1e-4)


def interrupt_rollouts_after(monkeypatch, rows: int, kind=signal.SIGINT) -> None:
    """Every rollout of the engine is cut by ``kind`` once ``rows`` rows have finished in all."""
    original = engine_module.api.rollout
    finished = [0]

    def cut(*args, on_finished=None, **kwargs):
        def counted(index, trajectory):
            if finished[0] == rows:
                if kind == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), kind)
            finished[0] += 1
            if on_finished is not None:
                on_finished(index, trajectory)

        return original(*args, on_finished=counted, **kwargs)

    monkeypatch.setattr(engine_module.api, "rollout", cut)
    import motab.synthesis

    monkeypatch.setattr(motab.synthesis, "rollout", cut)


# --- a used output is refused, and nothing in it changes ---------------------------------------------


def test_a_used_output_is_refused_by_every_command(toy, tmp_path, capsys):
    models = ["--student", str(toy / "student"), "--teacher", str(toy / "teacher"), "--data", str(toy / "train.jsonl")]
    used_file = tmp_path / "used.jsonl"
    used_file.write_text("mine\n")
    used_folder = tmp_path / "used"
    used_folder.mkdir()
    (used_folder / "results.json").write_text("{}")
    (used_folder / "config.json").write_text("{}")
    (used_folder / "metrics.jsonl").write_text("{}\n")
    (used_folder / "train.jsonl").write_text("mine\n")
    before = snapshot(tmp_path)
    cases = [
        ["rollout", *models, "--out", str(used_file)],
        ["synthesize", "--preset", "toy", *models, "--out", str(used_file)],
        ["eval", "--preset", "toy", "--model", str(toy / "student"), "--data", str(toy / "test.jsonl"),
         "--out", str(used_folder)],
        ["sft", "--model", str(toy / "student"), "--data", str(toy / "train.jsonl"), "--out", str(used_folder)],
        ["train", *models, "--output-dir", str(used_folder)],
        ["demo", "--quick", "--out", str(used_folder)],
        ["prepare", str(used_folder)],
    ]  # fmt: skip
    for argv in cases:
        line = refused(argv, capsys)
        assert "--overwrite" in line, line
        if argv[0] not in ("prepare", "sft"):  # a finished SFT (a saved model) has nothing to resume
            assert "--resume" in line, line
    for argv in cases[:-1]:
        line = refused([*argv, "--resume", "--overwrite"], capsys)
        assert "exclude each other" in line, line
    assert snapshot(tmp_path) == before


# --- interrupts keep what is done, in one line, and --resume continues --------------------------------


def test_ctrl_c_and_sigterm_in_synthesize_keep_the_records(toy, tmp_path, capsys, monkeypatch):
    argv = ["synthesize", "--preset", "toy", "--student", str(toy / "student"), "--teacher", str(toy / "teacher")]
    argv += ["--data", str(toy / "train.jsonl"), "--limit", "4", "--responses", "2"]
    assert main([*argv, "--out", str(tmp_path / "whole.jsonl")]) == 0
    assert not (tmp_path / "whole.jsonl.parts").exists()  # no temporaries after success
    assert json.loads((tmp_path / "whole.jsonl.run.json").read_text())["settings"]["provenance"]["teacher"]
    out = tmp_path / "cut.jsonl"
    for kind, code, kept in ((signal.SIGINT, 130, 3), (signal.SIGTERM, 143, 5)):
        with monkeypatch.context() as patched:
            interrupt_rollouts_after(patched, 3 if kind == signal.SIGINT else 2, kind)
            more = ["--resume"] if out.with_name("cut.jsonl.run.json").exists() else []
            line = interrupted([*argv, "--out", str(out), *more], capsys, code)
        assert line == f"motab synthesize: interrupted: kept {kept} records in {out}.parts; continue with --resume"
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert "8 records (3 new, 5 already there)" in capsys.readouterr().out
    assert_same_records(read(out), read(tmp_path / "whole.jsonl"))
    assert not out.with_name("cut.jsonl.parts").exists()


def test_ctrl_c_in_rollout_and_eval_keep_what_finished(toy, tmp_path, capsys, monkeypatch):
    rollout = ["rollout", "--student", str(toy / "student"), "--teacher", str(toy / "teacher")]
    rollout += ["--data", str(toy / "train.jsonl"), "--limit", "5", "--set", "rollout.max_new_tokens=24"]
    assert main([*rollout, "--out", str(tmp_path / "whole.jsonl")]) == 0
    out = tmp_path / "cut.jsonl"
    with monkeypatch.context() as patched:
        interrupt_rollouts_after(patched, 2)
        line = interrupted([*rollout, "--out", str(out)], capsys)
    assert line == f"motab rollout: interrupted: kept 2 trajectories in {out}.parts; continue with --resume"
    assert main([*rollout, "--out", str(out), "--resume"]) == 0
    assert_same_trajectories(read(out), read(tmp_path / "whole.jsonl"))
    # a rollout over an existing file: --overwrite
    assert main([*rollout, "--out", str(out), "--overwrite"]) == 0
    assert_same_trajectories(read(out), read(tmp_path / "whole.jsonl"))

    evaluate = ["eval", "--preset", "toy", "--model", str(toy / "student"), "--data", str(toy / "test.jsonl")]
    evaluate += ["--limit", "5", "--max-new-tokens", "16"]
    assert main([*evaluate, "--out", str(tmp_path / "eval-whole")]) == 0
    cut = tmp_path / "eval-cut"
    with monkeypatch.context() as patched:
        interrupt_rollouts_after(patched, 3)
        line = interrupted([*evaluate, "--out", str(cut)], capsys)
    assert line == f"motab eval: interrupted: kept 3 samples in {cut / '.parts'}; continue with --resume"
    assert main([*evaluate, "--out", str(cut), "--resume"]) == 0
    assert (cut / "test.jsonl").read_text() == (tmp_path / "eval-whole" / "test.jsonl").read_text()
    # interrupted before anything finished: nothing kept, and the same command simply runs again
    fresh = tmp_path / "eval-fresh"
    with monkeypatch.context() as patched:
        interrupt_rollouts_after(patched, 0)
        line = interrupted([*evaluate, "--out", str(fresh)], capsys)
    assert line == "motab eval: interrupted: no samples finished; nothing kept" and not (fresh / ".parts").exists()
    assert main([*evaluate, "--out", str(fresh)]) == 0


def test_the_demo_resumes_after_ctrl_c(tmp_path, capsys, monkeypatch):
    """An interrupted demo keeps its finished runs; --resume trains only the rest, to the report an
    uninterrupted demo writes."""
    import motab.demo.run as demo

    trained = []

    def fake_run(student, teacher, tokenizer, train, validation, config, progress=True):
        trained.append((config.seed, config.rollout.mode, config.steps))
        return dict(method=config.rollout.mode, steps=config.steps, curve=[(0, 0.5), (config.steps, 0.5)],
                    validation_accuracy=0.5, interventions_per_100=1.0, student_tokens=1, teacher_tokens=1,
                    train_seconds=10.0 + len(config.rollout.mode), weights_digest="x")  # fmt: skip

    monkeypatch.setattr(demo, "run_method", fake_run)
    monkeypatch.setattr(demo, "warm_start", lambda *args: (None, 0.4))
    monkeypatch.setattr(demo, "greedy_accuracy", lambda *args, **kwargs: 0.9)
    monkeypatch.setattr(demo, "teacher_decay", lambda *args: {"0": 1.0})
    monkeypatch.setattr(demo, "teacher_guidance", lambda *args: {"first_wrong": 1})
    monkeypatch.setattr(demo, "test_grades", lambda *args: dict.fromkeys(
        ("test_accuracy", "test_accuracy_last_answer", "test_marker_share"), 0.5
    ))  # fmt: skip
    monkeypatch.setattr(demo, "_render_rollout", lambda *args: None)
    monkeypatch.setattr(demo, "format_table", lambda results: "")
    assert main(["demo", "--quick", "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert not (tmp_path / "whole" / ".parts").exists()
    first = len(trained)

    calls = [0]
    original = fake_run

    def cut_run(*args, **kwargs):
        if calls[0] == 4:
            raise KeyboardInterrupt
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(demo, "run_method", cut_run)
    out = tmp_path / "cut"
    line = interrupted(["demo", "--quick", "--out", str(out)], capsys)
    assert line == f"motab demo: interrupted: kept 4 runs in {out / '.parts'}; continue with --resume"
    monkeypatch.setattr(demo, "run_method", fake_run)
    trained.clear()
    assert main(["demo", "--quick", "--out", str(out), "--resume"]) == 0
    assert len(trained) == first - 4  # only what the interrupt lost
    resumed = json.loads((out / "results.json").read_text())
    for key in ("runs", "methods", "teacher_decay", "teacher_guidance", "size"):
        assert resumed[key] == whole[key], key
    assert not (out / ".parts").exists()


def test_prepare_leaves_the_folder_as_it_was_when_interrupted(tmp_path, capsys, monkeypatch):
    import motab.demo.prepare as prepare

    out = tmp_path / "toy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def interrupted_warm_start(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "warm_student", interrupted_warm_start)
    line = interrupted(["prepare", str(out), "--warm-steps", "5"], capsys)
    assert line.startswith("motab prepare: interrupted: nothing kept")
    assert snapshot(tmp_path) == {"toy/notes.txt": b"mine"}


# --- checked before anything loads ------------------------------------------------------------------


def test_a_model_folder_without_a_tokenizer_is_one_line(toy, tmp_path, capsys, monkeypatch):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(toy / "student", bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    monkeypatch.setattr(motab.cli, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    line = refused(["eval", "--preset", "toy", "--model", str(bare), "--data", str(toy / "test.jsonl"),
                    "--out", str(tmp_path / "e")], capsys)  # fmt: skip
    assert line == (
        f"motab eval: error: the model folder {bare} has no tokenizer (tokenizer.json, tokenizer.model, "
        "vocab.json, ...): save it beside the model (tokenizer.save_pretrained(folder))"
    )
    line = refused(["synthesize", "--preset", "toy", "--student", str(bare), "--teacher", str(toy / "teacher"),
                    "--data", str(toy / "train.jsonl"), "--out", str(tmp_path / "r.jsonl")], capsys)  # fmt: skip
    assert f"the student folder {bare} has no tokenizer" in line
    assert not (tmp_path / "e").exists() and not (tmp_path / "r.jsonl.parts").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--set", "rollout.stop_strings=['']"], "rollout.stop_strings must be non-empty strings, got ['']"),
        (["--set", "rollout.step_stop=''"], "rollout.step_stop must be a non-empty string"),
    ],
)
def test_empty_stop_strings_are_refused(toy, tmp_path, capsys, argv, message):
    models = ["--student", str(toy / "student"), "--teacher", str(toy / "teacher"), "--data", str(toy / "train.jsonl")]
    line = refused(["rollout", *models, "--out", str(tmp_path / "r.jsonl"), *argv], capsys)
    assert message in line


def test_an_empty_step_stop_flag_is_refused(toy, tmp_path, capsys):
    models = ["--student", str(toy / "student"), "--teacher", str(toy / "teacher"), "--data", str(toy / "train.jsonl")]
    line = refused(["synthesize", "--preset", "toy", *models, "--out", str(tmp_path / "r.jsonl"), "--stop", ""], capsys)
    assert line == "motab synthesize: error: rollout.step_stop must be a non-empty string, got ''"


def test_prepare_shows_the_warm_start_and_takes_zero_steps(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "warm"), "--warm-steps", "3", "--train", "4"]) == 0
    shown = capsys.readouterr().out
    assert "warming up the student: 3 steps" in shown or "warm-starting the student: 3 steps" in shown
    assert "warm start step 2: loss" in shown
    assert sorted(p.name for p in (tmp_path / "warm").iterdir()) == sorted(
        ["student", "teacher", "test.jsonl", "train.jsonl", "validation.jsonl"]
    )
    assert not list(tmp_path.glob(".*.tmp"))  # the work folder is gone


def test_sft_takes_the_same_flags(toy, tmp_path, capsys):
    sft = ["sft", "--model", str(toy / "student"), "--data", str(toy / "train.jsonl"), "--out", str(tmp_path / "s")]
    line = refused([*sft, "--device", "cuda:1"], capsys)
    assert "choose them with CUDA_VISIBLE_DEVICES" in line
    line = refused([*sft, "--resume"], capsys)
    assert "--resume but" in line and "holds no checkpoint" in line


# --- silent mistakes warn ---------------------------------------------------------------------------


def test_settings_that_quietly_do_otherwise_warn(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(motab.cli, "load_model", lambda *a, **k: (_ for _ in ()).throw(SystemExit(0)))
    models = ["--student", str(toy / "student"), "--teacher", str(toy / "teacher"), "--data", str(toy / "train.jsonl")]
    with pytest.raises(SystemExit):
        main(["train", *models, "--output-dir", str(tmp_path / "run"), "--steps", "4"])
    err = capsys.readouterr().err
    assert "motab train: warning: train.warmup_steps (10) is more than train.steps (4): the learning rate never " in err
    with pytest.raises(SystemExit):
        main(["eval", "--preset", "toy", "--model", str(toy / "student"), "--data", str(toy / "test.jsonl"),
              "--samples", "2", "--out", str(tmp_path / "e")])  # fmt: skip
    assert "motab eval: warning: --samples 2 at temperature 0: greedy samples are all alike" in capsys.readouterr().err


def test_read_only_nothing_changes_on_a_refusal(toy, tmp_path, capsys):
    """A data file the command cannot read is refused in one line, and the output is not created."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"\n')
    bad.chmod(stat.S_IRUSR | stat.S_IWUSR)
    line = refused(["eval", "--preset", "toy", "--model", str(toy / "student"), "--data", str(bad),
                    "--out", str(tmp_path / "e")], capsys)  # fmt: skip
    assert "is not valid JSON" in line and not (tmp_path / "e").exists()
