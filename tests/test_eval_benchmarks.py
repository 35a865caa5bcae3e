"""The paper's benchmarks from local files in their Hugging Face layouts, the results folder of
``evaluate_benchmarks`` (resume after a kill, refusals) and ``motab eval`` end to end: several
benchmarks in one call, the paper's preset, and one line for each mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from motab.cli import main
from motab.config import ConfigError, EvaluationConfig
from motab.evaluate import evaluate_benchmarks, load_benchmark
from motab.evaluate.benchmarks import parse_data_sources
from motab.synthesis import response_seed
from tests.test_cli_errors import refused
from tests.test_evaluate import CharTokenizer, plant
from tests.tiny import tiny_qwen2, word_tokenizer

WORDS = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def gpqa_records(count: int) -> list[dict]:
    return [
        {
            "Record ID": f"rec{i}",
            "Question": f"Which is right {i}?",
            "Correct Answer": f"right {i}\n",
            "Incorrect Answer 1": f"wrong a{i}",
            "Incorrect Answer 2": f"wrong b{i}",
            "Incorrect Answer 3": f"wrong c{i}",
        }
        for i in range(count)
    ]


@pytest.mark.parametrize(
    "name,records,ids,references",
    [
        ("math500", [{"problem": "p", "solution": "s", "answer": r"\frac{1}{2}", "unique_id": "test/a.json"}],
         ["test/a.json"], [r"\frac{1}{2}"]),
        ("aime24", [{"id": 60, "problem": "p", "solution": "s", "answer": "204", "url": "u", "year": 2024}],
         ["60"], ["204"]),
        ("aime24", [{"ID": "2024-I-1", "Problem": "p", "Solution": "s", "Answer": 204}], ["2024-I-1"], ["204"]),
        ("aime25", [{"question": "p", "answer": "70"}], ["0"], ["70"]),
        ("amc23", [{"id": 0, "problem": "p", "answer": 27.0, "url": "u"}], ["0"], ["27.0"]),
    ],
)  # fmt: skip
def test_math_benchmarks_in_their_hub_layouts(tmp_path, name, records, ids, references):
    for path in (write_jsonl(tmp_path / "b.jsonl", records), tmp_path / "b.parquet"):
        pq.write_table(pa.Table.from_pylist(records), tmp_path / "b.parquet")
        benchmark = load_benchmark(name, path)
        assert benchmark.name == name and benchmark.answer_format == "math"
        assert [p.id for p in benchmark.problems] == ids and [p.reference for p in benchmark.problems] == references
        assert benchmark.problems[0].question == "p"


def test_gpqa_options_are_shuffled_per_problem_with_a_fixed_seed(tmp_path):
    path = write_jsonl(tmp_path / "gpqa.jsonl", gpqa_records(24))
    benchmark = load_benchmark("gpqa_diamond", path)
    assert benchmark.answer_format == "choice"
    letters = [p.reference for p in benchmark.problems]
    assert len(set(letters)) == 4  # the gold option is not always A
    for i, problem in enumerate(benchmark.problems):
        question, listed = problem.question.split("\n\n")
        assert question == f"Which is right {i}?" and problem.id == f"rec{i}"
        options = dict(line.split(") ", 1) for line in listed.splitlines())
        assert list(options) == ["A", "B", "C", "D"] and options[problem.reference] == f"right {i}"
    # the same order on every load, whatever the file's order or --limit
    reversed_path = write_jsonl(tmp_path / "reversed.jsonl", gpqa_records(24)[::-1])
    again = {p.id: p for p in load_benchmark("gpqa_diamond", reversed_path).problems}
    assert all(again[p.id] == p for p in benchmark.problems)
    assert load_benchmark("gpqa_diamond", path, limit=3).problems == benchmark.problems[:3]


def test_benchmark_files_that_do_not_fit_are_refused(tmp_path):
    no_answer = write_jsonl(tmp_path / "no-answer.jsonl", [{"problem": "p", "solution": "s"}])
    with pytest.raises(ValueError, match=r"is not laid out as aime24: its records have no answer field"):
        load_benchmark("aime24", no_answer)
    with pytest.raises(ValueError, match="has no 'Incorrect Answer 3'"):
        records = [{k: v for k, v in r.items() if k != "Incorrect Answer 3"} for r in gpqa_records(1)]
        load_benchmark("gpqa_diamond", write_jsonl(tmp_path / "g.jsonl", records))
    with pytest.raises(ValueError, match="the id '1' appears twice"):
        load_benchmark("aime25", write_jsonl(tmp_path / "twice.jsonl", [{"id": 1, "problem": "p", "answer": 1}] * 2))
    with pytest.raises(ValueError, match="unknown benchmark 'aime26'; known: math500, aime24"):
        parse_data_sources(["aime26=x.jsonl"])
    with pytest.raises(ValueError, match="with several data files, name each"):
        parse_data_sources([no_answer, "aime24=x.jsonl"])
    assert parse_data_sources([no_answer]) == [(None, no_answer)]
    assert parse_data_sources({"math500": "a", "gpqa_diamond": "b"}) == [("math500", "a"), ("gpqa_diamond", "b")]
    with pytest.raises(ValueError, match="names no answer field"):
        load_benchmark(None, write_jsonl(tmp_path / "input.jsonl", [{"input": "q"}]))


# --- evaluate_benchmarks: the results folder ---------------------------------------------------


@pytest.fixture
def two_benchmarks(tmp_path):
    problems = [{"id": i, "problem": f"q{i}", "answer": str(i)} for i in range(3)]
    math = load_benchmark("aime24", write_jsonl(tmp_path / "aime.jsonl", problems))
    choice = load_benchmark("gpqa_diamond", write_jsonl(tmp_path / "gpqa.jsonl", gpqa_records(2)))
    return [math, choice]


def writer(benchmarks, samples, kill_after=None):
    """Completions by seed: a math sample k of problem i is right when k ≤ i; a choice sample gives
    the gold letter on even k. ``kill_after`` raises KeyboardInterrupt (a kill) after that many."""
    plan = {}
    for b in benchmarks:
        for p in b.problems:
            for k in range(samples[b.name]):
                if b.answer_format == "math":
                    text = f"<think>try</think> so \\boxed{{{p.reference if k <= int(p.id) else 99}}}"
                else:
                    text = f"Answer: {p.reference if k % 2 == 0 else 'Z'}"
                plan[response_seed(0, f"{b.name}/{p.id}", k)] = text
    count = [0]

    def write(prompt, seed):
        if kill_after is not None and count[0] == kill_after:
            raise KeyboardInterrupt
        count[0] += 1
        return plan[seed], "eos"

    return write


def test_a_killed_eval_resumes_without_sampling_again(tmp_path, monkeypatch, two_benchmarks):
    config = EvaluationConfig(samples=4, temperature=0.6, top_p=0.95, prompt_format="raw")
    samples = {"aime24": 4, "gpqa_diamond": 4}
    plant(monkeypatch, writer(two_benchmarks, samples))
    whole = evaluate_benchmarks("m", CharTokenizer(), two_benchmarks, config, tmp_path / "whole", model_name="m")
    aime = whole.results["aime24"].score
    assert aime.avg == pytest.approx((1 + 2 + 3) / 12) and aime.pass_at[4][0] == pytest.approx(1.0)
    assert whole.results["gpqa_diamond"].score.avg == pytest.approx(0.5)
    assert whole.overall.avg == pytest.approx((aime.avg + 0.5) / 2)

    out = tmp_path / "killed"
    plant(monkeypatch, writer(two_benchmarks, samples, kill_after=7))
    with pytest.raises(KeyboardInterrupt):
        evaluate_benchmarks("m", CharTokenizer(), two_benchmarks, config, out, model_name="m")
    store = out / ".parts" / "samples.jsonl"
    assert len(store.read_text().splitlines()) == 7 and not (out / "results.json").exists()
    with open(store, "a") as f:
        f.write('{"benchmark": "aime24", "id": "2", "sa')  # a line the kill cut short
    with pytest.raises(ConfigError, match=r"holds an evaluation .* pass resume=True"):  # the API's words
        evaluate_benchmarks("m", CharTokenizer(), two_benchmarks, config, out, model_name="m")
    with pytest.raises(ConfigError, match=r"cannot resume .* other settings \(changed: sampling.temperature\)"):
        hotter = EvaluationConfig(samples=4, temperature=1.0, top_p=0.95, prompt_format="raw")
        evaluate_benchmarks("m", CharTokenizer(), two_benchmarks, hotter, out, model_name="m", resume=True)
    asked = []
    plant(monkeypatch, writer(two_benchmarks, samples), seen=asked)
    resumed = evaluate_benchmarks("m", CharTokenizer(), two_benchmarks, config, out, model_name="m", resume=True)
    assert len(asked) == 20 - 7  # only what the kill lost
    for name in samples:
        assert (out / f"{name}.jsonl").read_text() == (tmp_path / "whole" / f"{name}.jsonl").read_text()
        assert resumed.results[name].score == whole.results[name].score
    assert not (out / ".parts").exists()  # no temporaries after success
    with pytest.raises(ConfigError, match=r"nothing to resume .* \(it is complete: overwrite=True runs it again\)"):
        evaluate_benchmarks("m", CharTokenizer(), two_benchmarks, config, out, model_name="m", resume=True)


def test_results_record_what_produced_them(tmp_path, monkeypatch, two_benchmarks):
    config = EvaluationConfig(samples=None, temperature=0.6, top_p=0.95, max_new_tokens=64)
    samples = {"aime24": 4, "gpqa_diamond": 4}
    asked = []
    plant(monkeypatch, writer(two_benchmarks, samples), seen=asked)
    out = tmp_path / "eval"
    evaluate_benchmarks("m", CharTokenizer(), two_benchmarks, config, out, model_name="org/model", command=["eval"])
    record = json.loads((out / "results.json").read_text())
    assert record["model"] == "org/model" and record["command"] == ["eval"] and record["motab"]
    assert record["settings"]["temperature"] == 0.6 and record["settings"]["top_p"] == 0.95
    assert record["data"]["aime24"] == dict(path=two_benchmarks[0].path, answer_format="math", samples=4)
    assert record["data"]["gpqa_diamond"]["answer_format"] == "choice"
    assert set(record["benchmarks"]) == {"aime24", "gpqa_diamond"} and "overall" in record
    assert record["benchmarks"]["aime24"]["pass_at_k"]["4"]["value"] == pytest.approx(1.0)
    # the chat prompt: the template around the question and the format's instruction
    first = asked[0][0]
    assert first == "<user>q0\nPlease reason step by step, and put your final answer within \\boxed{}.</user>"
    assert any("put the letter of your final answer" in prompt for prompt, _ in asked)
    table = (out / "results.md").read_text()
    assert "| aime24 | 3 | 4 |" in table and "| overall |" in table and "pass@4" in table
    line = json.loads((out / "aime24.jsonl").read_text().splitlines()[0])
    assert line["extracted"] == ["0", "99", "99", "99"] and line["end"] == ["eos"] * 4
    # --overwrite removes this eval's files and nothing else
    (out / "mine.txt").write_text("kept")
    evaluate_benchmarks("m", CharTokenizer(), two_benchmarks[:1], config, out, model_name="m", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["aime24.jsonl", "mine.txt", "results.json", "results.md"]


def test_a_math_benchmark_with_one_sample_in_the_paper_preset(tmp_path):
    assert EvaluationConfig(samples=None).samples is None
    from motab.evaluate.run import pass_ks, samples_of

    config = EvaluationConfig(samples=None)
    assert samples_of(config, "math500") == 1 and samples_of(config, "aime24") == 4 and samples_of(config, None) == 1
    assert pass_ks(config, 4) == [1, 2, 4] and pass_ks(config, 1) == [1]
    with pytest.raises(ConfigError, match="pass@4 needs at least 4 samples a problem, but a benchmark draws 1"):
        pass_ks(EvaluationConfig(pass_k=(1, 4)), 1)


# --- motab eval ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tiny_qwen2(0, hidden=32, layers=1).save_pretrained(root / "model")
    word_tokenizer(WORDS, "<unk>", eos_token="<eos>").save_pretrained(root / "model")
    math = [{"id": i, "problem": f"w{i} w{i + 1}", "answer": str(i)} for i in range(3)]
    return dict(
        root=root,
        model=str(root / "model"),
        aime=write_jsonl(root / "aime.jsonl", math),
        gpqa=write_jsonl(root / "gpqa.jsonl", gpqa_records(2)),
        plain=write_jsonl(root / "plain.jsonl", [{"question": "w1 w2", "answer": "1"}]),
        no_answer=write_jsonl(root / "no-answer.jsonl", [{"problem": "w1", "solution": "s"}]),
    )


def eval_argv(workspace, out, *extra):
    return ["eval", "--model", workspace["model"], "--out", str(out), "--prompt-format", "raw", *extra]


def test_eval_runs_several_benchmarks_in_one_call(workspace, capsys):
    out = workspace["root"] / "several"
    argv = eval_argv(workspace, out, "--data", f"aime24={workspace['aime']}", f"gpqa_diamond={workspace['gpqa']}")
    argv += ["--samples", "2", "--temperature", "0.6", "--top-p", "0.95", "--max-new-tokens", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "aime24: avg@2" in printed and "gpqa_diamond: avg@2" in printed and "overall" in printed
    record = json.loads((out / "results.json").read_text())
    assert record["model"] == workspace["model"] and record["settings"]["top_p"] == 0.95
    assert {name: len((out / f"{name}.jsonl").read_text().splitlines()) for name in record["data"]} == {
        "aime24": 3, "gpqa_diamond": 2,
    }  # fmt: skip
    assert all(len(line["completions"]) == 2 for line in map(json.loads, (out / "aime24.jsonl").open()))
    # random words answer nothing: said, not silent
    assert "warning: no completion of aime24 gave an answer" in printed
    # a used folder is refused; --resume of a finished one says so; --overwrite runs it again
    assert main(argv) == 2 and "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 2 and "it is complete" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_eval_from_a_yaml_config_with_named_benchmarks(workspace, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"model: {workspace['model']}\ndata:\n  aime24: {workspace['aime']}\n"
        "evaluation: {max_new_tokens: 3, prompt_format: raw, samples: 1}\n"
    )
    assert main(["eval", "--config", str(config), "--out", str(tmp_path / "e"), "--limit", "2"]) == 0
    assert json.loads((tmp_path / "e" / "results.json").read_text())["benchmarks"]["aime24"]["problems"] == 2


@pytest.mark.parametrize(
    "data,extra,message",
    [
        ("no_answer", [], "no-answer.jsonl: records lack the field 'answer' (they have ['problem', 'solution'])"),
        ("aime24=no_answer", [], "is not laid out as aime24: its records have no answer field (answer or Answer)"),
        ("plain", ["--answer-format", "nope"], "unknown answer format 'nope'; registered: 'math', 'choice'"),
        ("plain", ["--answer-format", "boxed"], "'boxed' is now 'math'"),
        ("aime24=aime", ["--samples", "2", "--pass-k", "1,4"], "pass@4 needs at least 4 samples a problem"),
        ("aime26=aime", [], "unknown benchmark 'aime26'"),
        ("plain", ["--prompt-format", "chat"], "has no chat template: evaluation.prompt_format chat needs one"),
    ],
)
def test_eval_mistakes_are_one_line(workspace, capsys, monkeypatch, data, extra, message):
    import motab.cli

    monkeypatch.setattr(motab.cli, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    name, _, key = data.rpartition("=")
    given = f"{name}={workspace[key]}" if name else workspace[key]
    argv = eval_argv(workspace, workspace["root"] / "never", "--data", given, *extra)
    line = refused(argv, capsys)
    assert message in line, line
    assert not (workspace["root"] / "never").exists()


def test_the_paper_preset(workspace, capsys, monkeypatch):
    """--preset paper: the authors' sampling and 4 samples (1 on MATH-500); flags override it."""
    import motab.evaluate

    seen = {}

    def fake(model, tokenizer, benchmarks, config, out, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(motab.evaluate, "evaluate_benchmarks", fake)
    monkeypatch.setattr("motab.cli.load_model", lambda *a, **k: ("model", None))
    data = f"aime24={workspace['aime']}"
    argv = eval_argv(workspace, workspace["root"] / "paper", "--preset", "paper", "--data", data)
    with pytest.raises(SystemExit):
        main(argv)
    config = seen["config"]
    assert (config.temperature, config.top_p, config.max_new_tokens, config.samples) == (0.6, 0.95, 32768, None)
    with pytest.raises(SystemExit):
        main(argv + ["--samples", "2", "--max-new-tokens", "8"])
    assert (seen["config"].samples, seen["config"].max_new_tokens, seen["config"].temperature) == (2, 8, 0.6)


def test_the_readmes_eval_command_is_the_papers_protocol():
    """The README's real-scale command parses to the authors' settings on all five benchmarks."""
    import shlex

    import motab.cli
    from motab.config import build_section

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("### Evaluation: the paper's protocol")[1].split("```bash\n")[1].split("```")[0]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[0] == "motab"
    args = motab.cli.build_parser().parse_args(argv[1:])
    args.data = motab.cli._eval_data_flag(args.data)
    raw = motab.cli._raw_config(args, motab.cli.EVAL_PRESETS.get(args.preset))
    config = build_section("evaluation", raw.get("evaluation"))
    assert (config.temperature, config.top_p, config.max_new_tokens) == (0.6, 0.95, 32768)
    assert config.prompt_format == "chat" and config.samples is None
    assert sorted(raw["data"]) == sorted(["math500", "aime24", "aime25", "amc23", "gpqa_diamond"])
    from motab.evaluate.run import samples_of

    assert {name: samples_of(config, name) for name in raw["data"]} == {
        "math500": 1, "aime24": 4, "aime25": 4, "amc23": 4, "gpqa_diamond": 4,
    }  # fmt: skip
