"""One way into configuration for every command: a run file (--config), the flags (one table per
command) and --set, layered in that order over the command's defaults (synthesize: its preset);
each command reads only its own sections, and synthesize prints the settings it runs with."""

from __future__ import annotations

import pytest
import yaml

import motab.cli
import motab.sft
import motab.synthesis
from motab.cli import SFT_FLAGS, SYNTHESIZE_FLAGS, main
from motab.config import COMMANDS, SECTION_CLASSES, default_option
from motab.synthesis import SynthesisSummary
from tests.test_cli import toy_pipeline, workspace  # noqa: F401  (models and data on disk)


@pytest.fixture
def synthesize_calls(monkeypatch):
    seen = []

    def captured(student, teacher, tokenizer, questions, out, config, options, **kwargs):
        seen.append(dict(config=config, options=options))
        return SynthesisSummary(0, 0, 0, 0, 1.0)

    monkeypatch.setattr(motab.synthesis, "synthesize", captured)
    return seen


def test_synthesize_layers_preset_file_flags_and_set(toy_pipeline, synthesize_calls, tmp_path, capsys):  # noqa: F811
    """The toy preset sets the stop string, marker and budgets; the run file overrides some of them,
    a flag one of the file's, --set one of the flag's; the rest keeps the layer below."""
    run = tmp_path / "synth.yaml"
    run.write_text(
        yaml.safe_dump(
            dict(
                synthesis=dict(responses=3, marker="!!", batch_size=7),
                rollout=dict(mode="step_skd", max_new_tokens=50),
                monitor=dict(epsilon0=0.4),
                teacher_sampling=dict(temperature=0.9),
            )
        )
    )
    args = ["synthesize", "--preset", "toy", *toy_pipeline, "--config", str(run), "--out", str(tmp_path / "r.jsonl")]
    assert main(args + ["--responses", "4", "--marker", "??!", "--set", "synthesis.marker=Wait,"]) == 0
    config, options = synthesize_calls[-1]["config"], synthesize_calls[-1]["options"]
    assert (options.responses, options.marker, options.batch_size, options.seed) == (4, "Wait,", 7, 0)
    assert config.mode == "step_skd" and config.max_new_tokens == 50 and config.max_step_tokens == 24  # file, preset
    assert config.step_stop == "\n\n" and config.min_correction_tokens == 48  # the toy preset's
    assert config.monitor.epsilon0 == 0.4 and config.teacher_sampling.temperature == 0.9
    assert config.student_sampling.temperature == 0.6  # the preset's, not overridden
    # what it prints is what runs: the settled rollout (the mode's monitor settings, the tokenizer's
    # EOS and delimiters) and the synthesis section
    printed = yaml.safe_load(capsys.readouterr().out.split("resolved config:\n", 1)[1].split("\nwrote ", 1)[0])
    assert printed["synthesis"] == dict(responses=4, prompt_format="raw", marker="Wait,", seed=0, batch_size=7)
    assert printed["rollout"]["monitor"]["score"] == "teacher_nll" and printed["rollout"]["eos_token_ids"]
    assert printed["rollout"]["max_new_tokens"] == 50 and printed["rollout"]["mode"] == "step_skd"


def test_every_flag_sets_an_option_its_command_reads():
    """The flag tables name only options their command's sections hold (a typo there would be an
    option nobody reads)."""
    for command, flags in (("synthesize", SYNTHESIZE_FLAGS), ("sft", SFT_FLAGS)) + tuple(
        (name, getattr(motab.cli, f"{name.upper()}_FLAGS")) for name in ("train", "rollout", "eval")
    ):
        keys = COMMANDS[command]
        for flag in flags:
            for option in flag.options:
                section, _, name = option.partition(".")
                if not name:
                    assert section in keys.top_level, (command, flag.name)
                    continue
                assert section in keys.sections, (command, flag.name)
                default_option(option)  # the field exists
                assert name in SECTION_CLASSES[section].__dataclass_fields__, (command, flag.name)


def test_sft_reads_a_run_file_and_flags(toy_pipeline, monkeypatch, tmp_path):  # noqa: F811
    seen = {}

    def captured(model, data, out, options, **kwargs):
        seen.update(model=model, options=options)
        raise SystemExit(0)

    monkeypatch.setattr(motab.sft, "run_sft", captured)
    student = toy_pipeline[toy_pipeline.index("--student") + 1]
    records = tmp_path / "records.jsonl"
    records.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    run = tmp_path / "sft.yaml"
    run.write_text(yaml.safe_dump(dict(model=student, data=str(records), sft=dict(learning_rate=1e-4, max_steps=3))))
    with pytest.raises(SystemExit):
        main(["sft", "--config", str(run), "--out", str(tmp_path / "o"), "--no-packing", "--report-to", "none"])
    options = seen["options"]
    assert seen["model"] == student and options.learning_rate == 1e-4 and options.max_steps == 3
    assert options.packing is False and options.num_train_epochs == 6  # the flag, the default


@pytest.mark.parametrize(
    "command, text, refused",
    [
        ("eval", "evaluation: {samples: 0}\n", "evaluation.samples must be ≥ 1"),
        ("eval", "synthesis: {responses: 2}\n", "unknown config keys ['synthesis']"),
        ("sft", "sft: {learning_rate: -1}\n", "SFTOptions.learning_rate must be > 0"),
        ("synthesize", "evaluation: {samples: 2}\n", "unknown config keys ['evaluation']"),
        ("synthesize", "synthesis: {prompt_format: html}\n", "unknown prompt format 'html'"),
        ("synthesize", "rollout: {mode: motab}\n", "synthesize runs a step mode"),
    ],
)
def test_a_run_file_is_checked_before_any_model_loads(workspace, command, text, refused, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run.yaml"
    run.write_text(text)
    models = {
        "eval": ["--model", workspace["student"]],
        "sft": ["--model", workspace["student"]],
        "synthesize": ["--student", workspace["student"], "--teacher", workspace["teacher"]],
    }[command]
    args = [command, "--config", str(run), *models, "--data", workspace["data"], "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert refused in err and len(err.splitlines()) == 1


def test_eval_reads_its_section_from_a_run_file(workspace, monkeypatch, tmp_path):  # noqa: F811
    import motab.evaluate

    seen = {}

    def captured(model, tokenizer, benchmarks, config, out, **kwargs):
        seen.update(vars(config))
        raise SystemExit(0)

    monkeypatch.setattr(motab.evaluate, "evaluate_benchmarks", captured)
    run = tmp_path / "eval.yaml"
    run.write_text(
        yaml.safe_dump(
            dict(
                model=workspace["student"],
                data=workspace["data"],
                evaluation=dict(samples=3, temperature=0.7, prompt_format="raw"),
            )
        )
    )
    with pytest.raises(SystemExit):
        main(["eval", "--config", str(run), "--batch-size", "5", "--out", str(tmp_path / "e")])
    assert seen["samples"] == 3 and seen["temperature"] == 0.7 and seen["batch_size"] == 5
    assert seen["max_new_tokens"] == 512 and seen["answer_format"] == "math"
