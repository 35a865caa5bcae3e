"""Every published number has its record: the README's demo results are generated from the newest
committed run record (and the shipped tuning record), the prose beside them cites only what that
block prints, and every GPU timing quoted next to a card's name is in benchmarks/RESULTS.md."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest

from motab.demo import report
from motab.demo.run import tuning_record_path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
CARDS = re.compile(r"\b(H100|H200|A100|B200)\b")
# A timing: a number followed by ms or µs, alone or at the head of a list "71.2 / 54.1 / 6.50 ms",
# "71.2 vs 31.3 ms"; or a range "124–313" (its unit may come before it).
TIMING = re.compile(r"\d+(?:\.\d+)?(?=(?:\s*(?:/|vs|–)\s*\d+(?:\.\d+)?)*\s*(?:ms|µs)\b)")
RANGE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)–(\d+(?:\.\d+)?)(?![\w.])")


def project_text_files() -> list[Path]:
    """The project's Markdown, Python and shell files: the top-level documents and every file under
    its own folders (an environment inside the checkout is not read)."""
    folders = ("motab", "motab_kernels", "benchmarks", "tests", "examples", "reports", "configs", ".ci")
    paths = [*ROOT.glob("*.md"), *(p for folder in folders for p in (ROOT / folder).rglob("*"))]
    return [p for p in paths if p.suffix in (".md", ".py", ".sh") and p.is_file() and "__pycache__" not in p.parts]


def quoted_gpu_timings(text: str) -> set[str]:
    """The timings in the paragraphs of ``text`` that name a GPU."""
    found = set()
    for paragraph in re.split(r"\n\s*\n", text):
        if CARDS.search(paragraph):
            found.update(TIMING.findall(paragraph))
            for match in RANGE.finditer(paragraph):  # a range of times: its unit stands next to it
                if re.search(r"ms|µs", paragraph[max(0, match.start() - 12) : match.end() + 4]):
                    found.update(match.groups())
    return found


def test_the_gpu_timing_finder_finds_lists_comparisons_and_ranges():
    text = "On an H200: fused 71.2 / 54.1 / 6.50 ms vs buffered 31.3 ms; its GPU µs (124–313), 650–750 TFLOP/s."
    assert quoted_gpu_timings(text + "\n\nA CPU: 460 ms.") == {"71.2", "54.1", "6.50", "31.3", "124", "313"}


def test_every_gpu_timing_quoted_in_the_repository_is_in_results():
    missing = {}
    for path in project_text_files():
        if path.name == "RESULTS.md" or path == Path(__file__).resolve():
            continue
        for number in quoted_gpu_timings(path.read_text(encoding="utf-8")):
            if not re.search(rf"(?<![\d.]){re.escape(number)}(?!\d)", RESULTS):
                missing.setdefault(str(path.relative_to(ROOT)), []).append(number)
    assert not missing, f"GPU timings without a record in benchmarks/RESULTS.md: {missing}"


# ------------------------------------------------------------------------------ the demo's tables
def test_the_readme_demo_results_are_the_newest_records():
    assert report.main(["--root", str(ROOT), "--check"]) == 0, "run python -m motab.demo.report"


def newest():
    return json.loads(report.newest_record(ROOT).read_text(encoding="utf-8"))


def test_the_record_says_how_and_where_it_was_made():
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(report.newest_record(ROOT))])
    assert ignored.returncode != 0, "the run record is git-ignored: it would not be committed"
    facts = newest()["provenance"]
    assert facts["command"].startswith("motab demo") and re.fullmatch(r"[0-9a-f]{40}\+?", facts["commit"])
    assert facts["seconds"] > 0 and len(facts["load_at_start"]) == len(facts["load_at_end"]) == 3


def test_a_changed_seed_changes_the_published_block():
    results, tuning = newest(), json.loads(tuning_record_path().read_text(encoding="utf-8"))
    block = report.results_block(results, tuning, "r.json")
    changed = copy.deepcopy(results)
    run = next(r for r in changed["runs"] if r["method"] == "off_policy" and r["budget"] == "steps")
    run["test_accuracy"] += 0.002  # one more problem right
    with pytest.raises(ValueError, match="summary differs"):  # the stored summary no longer matches
        report.results_block(changed, tuning, "r.json")
    changed["methods"] = json.loads(json.dumps(report.summarize(changed["runs"])))
    assert report.results_block(changed, tuning, "r.json") != block
    other = copy.deepcopy(results)
    other["runs"][0]["options"] = {"train.learning_rate": 1.0}
    with pytest.raises(ValueError, match="other settings"):
        report.results_block(other, tuning, "r.json")


def prose_beside_the_block() -> str:
    """The hand-written part of the README's results section: from its heading to the next one,
    the generated block left out."""
    section = README[README.index("### Results under the protocol") :]
    section = section[: section.index("\n#", 1)]
    start, end = section.index(report.BEGIN), section.index(report.END) + len(report.END)
    return section[:start] + section[end:]


def test_the_prose_beside_the_demo_tables_cites_only_what_the_record_gives():
    block = README[README.index(report.BEGIN) : README.index(report.END)]
    prose = prose_beside_the_block()
    # numbers standing alone (not inside a word such as a commit id or ε0)
    numbers = re.findall(r"(?<![\w.])[+−-]?\d+(?:\.\d+)?(?![\w])", prose.replace(",", ""))
    missing = [n for n in numbers if n.lstrip("+−-") not in block.replace(",", "")]
    assert not missing, f"numbers in the README's demo prose that the generated block does not print: {missing}"


def test_the_rerun_at_this_engine_cites_its_record_and_the_published_one():
    """Each "method rerun / record" pair of the README's seed-0 rerun is that method's test
    accuracy at equal steps in the rerun's record and in the published record (seed 0)."""
    block = README[README.index("<!-- rerun-seed0 -->") : README.index("<!-- /rerun-seed0 -->")]
    pairs = re.findall(r"(\w+)\s+(\d+\.\d) / (\d+\.\d)", block)
    rerun = json.loads((ROOT / "reports" / "demo" / "reruns" / "2026-12-05-seed0-at-0601a34.json").read_text())
    published = json.loads((ROOT / "reports" / "demo" / "records" / "2026-12-05-seeds3.json").read_text())

    def accuracy(record, method):
        (run,) = [r for r in record["runs"] if (r["method"], r["seed"], r["budget"]) == (method, 0, "steps")]
        return f"{100 * run['test_accuracy']:.1f}"

    assert len(pairs) == len(rerun["methods"]) == 8
    assert rerun["provenance"]["commit"].startswith("0601a34")
    for method, new, old in pairs:
        assert (new, old) == (accuracy(rerun, method), accuracy(published, method)), method
