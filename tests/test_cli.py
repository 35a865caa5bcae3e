"""`motab train / rollout / eval` end to end on tiny models saved to disk (nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import yaml

from motab.cli import main
from tests.tiny import tiny_qwen2, word_tokenizer

WORDS = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]


def save_model(folder, seed, hidden, layers, words=WORDS):
    tiny_qwen2(seed, hidden=hidden, layers=layers).save_pretrained(folder)
    word_tokenizer(words, "<unk>", eos_token="<eos>").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "problems.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"w{i} w{i + 1} w{i + 2}", "answer": str(i)}) + "\n" for i in range(6))
    )
    return dict(
        root=root,
        data=str(data),
        student=save_model(root / "student", 0, 32, 1),
        teacher=save_model(root / "teacher", 1, 64, 2),
    )


def test_train_from_a_yaml_config_and_resume(workspace, capsys):
    root = workspace["root"]
    config = dict(
        student=workspace["student"],
        teacher=workspace["teacher"],
        data=workspace["data"],
        train=dict(
            output_dir=str(root / "run"),
            steps=2,
            prompts_per_step=2,
            micro_batch=1,
            save_every=1,
            learning_rate=1e-3,
            warmup_steps=1,
        ),
        rollout=dict(mode="motab", max_new_tokens=8, draft_len=4, intervention_len=2),
        monitor=dict(rule="fixed", tau=0.5, warmup=1),
    )
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(root / "run.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "resolved config:" in printed and "mode: motab" in printed and "tau: 0.5" in printed
    # printed once the tokenizer and the models filled them in
    assert "eos_token_ids: [1]\n" in printed and "vocab_size: 64\n" in printed
    assert (root / "run" / "latest").read_text() == "checkpoint-2"
    assert len((root / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    record = json.loads((root / "run" / "run.json").read_text())  # what produced the run
    assert record["student"] == workspace["student"] and record["settings"]["steps"] == 2 and record["motab"]
    # more steps on top, resumed, with a flag and an override
    assert (
        main(["train", "--config", str(root / "run.yaml"), "--steps", "3", "--set", "monitor.tau=0.7", "--resume"]) == 0
    )
    assert (root / "run" / "latest").read_text() == "checkpoint-3"
    assert len((root / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    # each changed setting is one line of its own
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert sorted(warned) == [
        f"motab train: warning: resuming {root / 'run' / 'checkpoint-2'}: {change}"
        for change in (
            "monitor.tau changed from 0.5 in the checkpoint to 0.7",
            "train.steps changed from 2 in the checkpoint to 3",
        )
    ]


def test_rollout_writes_jsonl_and_a_png(workspace):
    root = workspace["root"]
    out, png = root / "traj.jsonl", root / "traj.png"
    code = main(
        [
            "rollout",
            "--student",
            workspace["student"],
            "--teacher",
            workspace["teacher"],
            "--data",
            workspace["data"],
            "--limit",
            "3",
            "--out",
            str(out),
            "--render",
            str(png),
            "--set",
            "monitor.rule=fixed",
            "--set",
            "monitor.tau=0.3",
            "--set",
            "monitor.warmup=0",
            "--set",
            "rollout.max_new_tokens=12",
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(len(r["tokens"]) <= 12 for r in records) and "text" in records[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rollout_shows_a_bar_on_a_terminal_and_keeps_transformers_bars_out(workspace, capsys, monkeypatch):
    import sys

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    loaded_with_bars = []
    load = AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        loaded_with_bars.append(hf_logging.is_progress_bar_enabled())
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # the bar shows on terminals only
    out = workspace["root"] / "bar.jsonl"
    argv = ["rollout", "--student", workspace["student"], "--teacher", workspace["teacher"], "--data"]
    argv += [workspace["data"], "--limit", "3", "--out", str(out), "--set", "rollout.max_new_tokens=6"]
    assert main(argv) == 0
    shown = capsys.readouterr()
    last = shown.err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("rollout") and "3/3" in last and "tokens/s" in last
    assert loaded_with_bars == [False, False] and hf_logging.is_progress_bar_enabled()


def test_eval_writes_a_summary(workspace):
    out = workspace["root"] / "eval"
    code = main(
        [
            "eval",
            "--model",
            workspace["student"],
            "--data",
            workspace["data"],
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--prompt-format",
            "raw",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert json.loads((out / "results.json").read_text())["benchmarks"]["problems"]["problems"] == 2


def test_errors_are_clear(workspace, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(dict(student="x", teacher="y", data="z", trainer=dict(steps=1))))
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown config keys ['trainer']" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--student",
                str(tmp_path / "nope"),
                "--teacher",
                workspace["teacher"],
                "--data",
                workspace["data"],
            ]
        )
        == 2
    )
    assert f"the student folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--student",
                workspace["student"],
                "--teacher",
                workspace["teacher"],
                "--data",
                workspace["data"],
                "--set",
                "train.learning_rat=1",
            ]
        )
        == 2
    )
    assert "unknown train options ['learning_rat']" in capsys.readouterr().err
    other = save_model(tmp_path / "other", 2, 32, 1, words=WORDS[:-1] + ["zzz"])
    assert main(["train", "--student", workspace["student"], "--teacher", other, "--data", workspace["data"]]) == 2
    assert "tokenizers differ" in capsys.readouterr().err


def test_the_papers_pipeline_synthesize_sft_eval_on_the_toy_task(toy_pipeline, tmp_path, capsys):
    """The README's three commands on the toy task (the shipped teacher, an untrained toy student)."""
    from motab.toy.task import generate_split

    student = toy_pipeline[toy_pipeline.index("--student") + 1]
    records = tmp_path / "records.jsonl"
    synthesize = ["synthesize", "--preset", "toy", *toy_pipeline]
    synthesize += ["--responses", "2", "--out", str(records), "--render", str(tmp_path / "r.png")]
    assert main(synthesize) == 0
    written = [json.loads(line) for line in records.read_text().splitlines()]
    assert [(r["id"], r["response_index"]) for r in written] == [(i, k) for i in range(6) for k in range(2)]
    assert any(r["breach"] for r in written)  # an untrained student strays at once
    for r in written:
        if r["breach"]:
            assert r["output"] == "".join(s["text"] for s in r["steps"]) + "??\n\n" + r["correction"]
    assert (tmp_path / "r.png").stat().st_size > 0
    # a used output is refused without --resume; with it nothing is redone
    capsys.readouterr()
    assert main(synthesize) == 2 and "--resume" in capsys.readouterr().err
    assert main(synthesize + ["--resume"]) == 0 and "12 records (0 new, 12 already there)" in capsys.readouterr().out
    assert records.read_text().splitlines() == [json.dumps(r, ensure_ascii=False) for r in written]
    sft = ["sft", "--model", student, "--data", str(records), "--out", str(tmp_path / "sft"), "--max-steps", "2"]
    assert main(sft + ["--max-length", "256", "--learning-rate", "1e-3"]) == 0
    assert main(sft) == 2 and "already holds checkpoints" in capsys.readouterr().err
    # --overwrite starts again there (checkpoints and model replaced), on the CPU as asked
    assert main(sft + ["--max-length", "256", "--overwrite", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "sft" / "sft.run.json").read_text())["options"]["max_steps"] == 2
    test = tmp_path / "test.jsonl"
    test.write_text(
        "".join(json.dumps(dict(question=p.prompt, answer=p.answer)) + "\n" for p in generate_split("test", 4))
    )
    out = tmp_path / "eval"
    assert main(["eval", "--preset", "toy", "--model", str(tmp_path / "sft"), "--data", str(test)] + [
        "--max-new-tokens", "48", "--out", str(out),
    ]) == 0  # fmt: skip
    assert json.loads((out / "results.json").read_text())["benchmarks"]["test"]["problems"] == 4


def test_rollout_in_batches_writes_what_one_batch_writes(workspace):
    """--batch-size only changes how many rows share a cache (and how often the bar moves): row i
    keeps seed i, so the trajectories are the same."""
    root = workspace["root"]
    common = ["--student", workspace["student"], "--teacher", workspace["teacher"], "--data", workspace["data"]]
    common += ["--limit", "3", "--set", "monitor.rule=fixed", "--set", "monitor.tau=0.3"]
    common += ["--set", "rollout.max_new_tokens=12"]
    written = []
    for batch in ("16", "2"):
        out = root / f"batch{batch}.jsonl"
        assert main(["rollout", *common, "--batch-size", batch, "--out", str(out)]) == 0
        written.append([json.loads(line)["tokens"] for line in out.read_text().splitlines()])
    assert written[0] == written[1] and len(written[0]) == 3


@pytest.fixture(scope="module")
def toy_pipeline(tmp_path_factory):
    """An untrained toy student saved beside the shipped teacher, and six train questions."""
    from motab.demo.run import STUDENT_SHAPE
    from motab.demo.toy_models import toy_model
    from motab.toy.task import generate_split
    from motab.toy.teacher import load_teacher, teacher_path

    root = tmp_path_factory.mktemp("toy")
    _, tokenizer = load_teacher()
    toy_model(tokenizer, STUDENT_SHAPE, 0).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    data = root / "train.jsonl"
    data.write_text(
        "".join(json.dumps(dict(question=p.prompt, answer=p.answer)) + "\n" for p in generate_split("train", 6))
    )
    return ["--student", str(root / "student"), "--teacher", str(teacher_path()), "--data", str(data)]


def test_synthesize_flags_reach_the_rollout_and_the_options(toy_pipeline, tmp_path, monkeypatch):
    """Each flag of ``motab synthesize`` lands in the setting it names; without them, the preset's."""
    import motab.synthesis
    from motab.synthesis import SynthesisSummary

    seen = {}

    def captured(student, teacher, tokenizer, questions, out, config, options, **kwargs):
        seen.update(config=config, options=options, questions=questions)
        return SynthesisSummary(0, 0, 0, 0, 1.0)

    monkeypatch.setattr(motab.synthesis, "synthesize", captured)
    base = ["synthesize", "--preset", "toy", *toy_pipeline, "--out", str(tmp_path / "r.jsonl")]
    assert main(base) == 0
    config, options = seen["config"], seen["options"]
    assert config.monitor.adaptive_boundary and config.monitor.entropy_top_k == 20
    assert (config.monitor.epsilon0, config.monitor.theta, config.step_skd_gamma) == (0.2, 1.0, 0.9)
    assert config.step_stop == "\n\n" and not config.trim_stop and config.max_new_tokens == 96
    assert config.student_sampling.temperature == config.teacher_sampling.temperature == 0.6
    assert (options.responses, options.marker, options.seed, options.prompt_format) == (5, "??", 0, "raw")
    flags = ["--mode", "step_skd", "--static-boundary", "--top-k", "7", "--epsilon0", "0.3", "--theta", "2.5"]
    flags += ["--gamma", "0.45", "--temperature", "0.8", "--stop", "\\n", "--trim-stop", "--max-new-tokens", "40"]
    flags += ["--max-step-tokens", "9", "--responses", "2", "--marker", "!!", "--seed", "4", "--batch-size", "3"]
    flags += ["--limit", "4", "--overwrite"]
    assert main(base + flags) == 0
    config, options = seen["config"], seen["options"]
    assert config.mode == "step_skd" and not config.monitor.adaptive_boundary and config.monitor.entropy_top_k == 7
    assert (config.monitor.epsilon0, config.monitor.theta, config.step_skd_gamma) == (0.3, 2.5, 0.45)
    assert config.step_stop == "\n" and config.trim_stop and config.max_new_tokens == 40 and config.max_step_tokens == 9
    assert config.student_sampling.temperature == config.teacher_sampling.temperature == 0.8
    assert (options.responses, options.marker, options.seed, options.batch_size) == (2, "!!", 4, 3)
    assert len(seen["questions"]) == 4


def test_synthesize_static_boundary_and_top_k_shape_the_records(toy_pipeline, tmp_path):
    """On the toy models: --static-boundary holds every step to ε0 itself while H is still
    measured; --top-k 1 measures H over one token, which is always 0."""
    common = ["synthesize", "--preset", "toy", *toy_pipeline, "--responses", "1", "--epsilon0", "0.25"]

    def student_steps(*flags):
        out = tmp_path / f"r{len(flags)}.jsonl"
        assert main(common + ["--out", str(out), *flags]) == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        return [s for r in records for s in r["steps"] if s["writer"] == "student"]

    adaptive = student_steps()
    assert any(s["entropy"] > 0 and s["boundary"] < 0.25 for s in adaptive)  # H > 0 lowers the boundary
    static = student_steps("--static-boundary")
    assert static and all(s["boundary"] == 0.25 for s in static) and any(s["entropy"] > 0 for s in static)
    one = student_steps("--top-k", "1", "--theta", "3")
    assert one and all(s["entropy"] == 0 and s["boundary"] == 0.25 for s in one)
