"""A training run's folder: what makes it used, what ``--overwrite`` clears, the checkpoints that
``save_total_limit`` keeps and the metrics cut back on resume. It imports no torch, so the CLI
refuses a used folder before anything heavy loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from motab.config import ConfigError, changed_fields

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# the files a run writes besides its checkpoints (and their temporaries): all --overwrite removes
RUN_FILES = ("latest", "metrics.jsonl", "loss.png")


def checkpoints(out: Path) -> list[Path]:
    """The run's checkpoint folders, oldest (lowest step) first."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    return int(CHECKPOINT.fullmatch(folder.name).group(1))


def temporaries(out: Path) -> list[Path]:
    """What a save or a metrics rewrite cut short leaves behind (``.checkpoint-N.tmp`` and others)."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def is_used(out: Path) -> bool:
    """Whether ``out`` holds a run: a checkpoint, ``latest`` or ``metrics.jsonl``."""
    return bool(checkpoints(out)) or (out / "latest").exists() or (out / "metrics.jsonl").exists()


def check_run_folder(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuses (ConfigError) a used folder without ``resume`` or ``overwrite``, both at once, and a
    resume with nothing to resume; reads only."""
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run or start it again")
    if resume:
        latest_checkpoint(out)
    elif not overwrite and is_used(out):
        raise ConfigError(
            f"{out} holds a run (checkpoints, latest or metrics.jsonl): pass --resume to continue it or "
            "--overwrite to start again there, or choose another output_dir"
        )


def latest_checkpoint(out: Path) -> Path:
    """The folder ``latest`` points at; ConfigError if there is none or it is missing."""
    pointer = out / "latest"
    if not pointer.is_file():
        raise ConfigError(f"no checkpoint to resume from in {out} (no 'latest' file); start it again with --overwrite")
    name = pointer.read_text().strip()
    folder = out / name
    if not name or not folder.is_dir():
        raise ConfigError(f"{pointer} points at {name!r}, which is not a checkpoint folder in {out}")
    return folder


def clear_run(out: Path) -> None:
    """Removes the run's own files (checkpoints, latest, metrics, temporaries) and nothing else."""
    for folder in checkpoints(out):
        shutil.rmtree(folder)
    remove_temporaries(out)
    for path in (out / name for name in RUN_FILES):
        if path.exists():
            _remove(path)


def remove_temporaries(out: Path) -> None:
    """Removes what an earlier save cut short (a kill, a full disk): nothing reads these."""
    for path in temporaries(out):
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def cut_metrics(path: Path, step: int) -> None:
    """Drops the lines of ``path`` logged after ``step`` (the steps a resume runs again), atomically."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if _logged_step(line) <= step]
    write_atomically(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary beside it: a kill leaves the old file or the new one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def drop_cut_line(path: Path) -> None:
    """Cuts an append-only JSONL file back to its last complete line (a kill mid-write leaves a
    partial one, which the next line would otherwise be glued to)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as after every checkpoint."""
    record = metrics_line(line)
    return record["step"] if record is not None and "step" in record else float("inf")


def metrics_line(line: str) -> dict | None:
    """A line of metrics.jsonl, or None for one a kill cut short."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def checkpoints_to_delete(out: Path, limit: int | None) -> list[Path]:
    """The checkpoints beyond the newest ``limit``, never the one ``latest`` points at."""
    if limit is None:
        return []
    pointer = out / "latest"
    current = pointer.read_text().strip() if pointer.is_file() else None
    found = checkpoints(out)
    return [folder for folder in found[: max(len(found) - limit, 0)] if folder.name != current]


class RowProgress:
    """A tqdm bar of rows done with the committed tokens per second beside it, on stderr. ``show``
    None shows it only when stderr is a terminal, so logs and captured output get no bar lines."""

    def __init__(self, rows: int, desc: str, show: bool | None) -> None:
        from tqdm.auto import tqdm

        self.tokens, self.started = 0, time.perf_counter()
        self.bar = tqdm(total=rows, desc=desc, unit="row", disable=None if show is None else not show)

    def update(self, rows: int, tokens: int, note: str = "") -> None:
        """``rows`` more done, holding ``tokens`` committed tokens; ``note`` is shown after the rate."""
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(
            ", ".join(filter(None, [f"{self.tokens / elapsed:.0f} tokens/s", note])), refresh=False
        )
        self.bar.update(rows)

    def __enter__(self) -> RowProgress:
        return self

    def close(self) -> None:
        self.bar.close()

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextmanager
def without_hf_bars() -> Iterator[None]:
    """transformers' own progress bars (loading weights) off for the block, as they were after it: they
    would break into the command's bars."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# --- interrupts: every command keeps the same promise. SIGTERM (what cluster schedulers send) ends a
# command as Ctrl-C does; what the command kept is said in one line (``motab.cli.main``).


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt("SIGTERM") as SIGINT raises KeyboardInterrupt, so a command
    keeps what it has done the same way; the previous handler is back afterwards. Signal handlers
    can only be set in the main thread: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(number, frame):
        raise KeyboardInterrupt(signal.Signals(number).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def interrupting_signal(interrupt: KeyboardInterrupt) -> int:
    """The signal behind ``interrupt``: SIGTERM when ``sigterm_as_interrupt`` raised it (it names the
    signal), else SIGINT. A command exits with 128 + it, as a shell reports a process the signal ended."""
    name = interrupt.args[0] if interrupt.args else ""
    return int(signal.Signals[name]) if name in signal.Signals.__members__ else int(signal.SIGINT)


def append_line(sink, record: dict) -> None:
    """``record`` as one JSON line of an append-only file, on disk before this returns (fsynced), so a
    kill loses only what had not finished."""
    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    sink.flush()
    os.fsync(sink.fileno())


def json_lines(path: Path) -> list[dict]:
    """The complete lines of an append-only JSONL file (none if it is missing); a line a kill cut
    short is skipped."""
    found = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def refuse_other_settings(out, before: dict | None, now: dict) -> None:
    """A resume of ``out`` under settings other than those it recorded is refused, naming each one changed."""
    if before != now:
        changed = sorted(".".join(keys) for keys, _, _ in changed_fields(before or {}, now))
        raise ConfigError(f"cannot resume {out} with other settings (changed: {', '.join(changed)})")


def count_lines(*paths: Path) -> int:
    """The complete lines of append-only JSONL files (a line a kill cut short is not counted)."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.read_bytes().count(b"\n")
    return total


# --- a JSONL output built from records appended as their rows finish (synthesize, rollout) ---------

CLI_FLAGS = ("--resume", "--overwrite")
API_FLAGS = ("resume=True", "overwrite=True")


class PartsOutput:
    """An output file ``X`` written from records appended, fsynced, to part files in ``X.parts/`` as
    their rows finish, then merged into ``X`` atomically (the parts removed); ``X.run.json`` records
    what produced it (motab's version, the command, the settings) and is what a resume compares.
    ``flags`` name resume and overwrite in refusals as the caller spells them."""

    def __init__(self, out: str | Path, flags: tuple[str, str] = CLI_FLAGS) -> None:
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.record = self.out.with_name(self.out.name + ".run.json")
        self.flags = flags
        self.fresh = False  # prepared for a new run (not a resume)

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuses a used output (the file or its parts) without resume or overwrite, both at once,
        and a resume with nothing to resume; reads only."""
        resume_flag, overwrite_flag = self.flags
        if resume and overwrite:
            raise ConfigError(
                f"{resume_flag} and {overwrite_flag} exclude each other: continue the run or start it again"
            )
        if not (resume or overwrite) and (self.out.exists() or self.parts.exists()):
            raise ConfigError(
                f"{self.out if self.out.exists() else self.parts} exists: pass {resume_flag} to continue that run or "
                f"{overwrite_flag} to start it again, or choose another output"
            )
        if resume and not self.record.exists():
            raise ConfigError(f"nothing to resume: {self.record} (the record of a run into {self.out}) does not exist")

    def prepare(self, settings: dict, resume: bool, overwrite: bool) -> None:
        """A fresh run needs a fresh output (overwrite removes the old one, its parts and its
        record); a resume needs the settings of the run it resumes."""
        self.check(resume, overwrite)
        now = json.loads(json.dumps(settings))
        if resume:
            refuse_other_settings(self.out, json.loads(self.record.read_text(encoding="utf-8")).get("settings"), now)
            self.parts.mkdir(exist_ok=True)
            return
        self.fresh = True
        if overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            for path in (self.out, self.out.with_name(f".{self.out.name}.tmp"), self.record):
                path.unlink(missing_ok=True)
        self.parts.mkdir(parents=True)
        write_run_record(self.record, settings=now)

    @contextmanager
    def appending(self, rank: int = 0) -> Iterator:
        """Rank ``rank``'s part file, cut back to its last complete line, open for appending. A new
        run that stops (an error, an interrupt) before it wrote a record leaves no trace: its parts
        and record are removed, so the same command can simply run again."""
        path = self.parts / f"part-{rank}.jsonl"
        drop_cut_line(path)
        try:
            with open(path, "a", encoding="utf-8") as sink:
                yield sink
        except BaseException:
            if self.fresh and self.kept() == 0:
                shutil.rmtree(self.parts, ignore_errors=True)
                self.record.unlink(missing_ok=True)
            raise

    def records(self) -> list[dict]:
        """The records already written: an earlier run's output, then the part files' complete lines."""
        found = []
        if self.out.exists():
            found = [json.loads(line) for line in self.out.read_text(encoding="utf-8").splitlines()]
        for path in sorted(self.parts.glob("part-*.jsonl")):
            found += json_lines(path)
        return found

    def kept(self) -> int:
        """Records in the part files (what an interrupted run keeps for its resume)."""
        return count_lines(*self.parts.glob("part-*.jsonl"))

    def said(self, what: str) -> str:
        """What an interrupted run kept, in the one line every command prints."""
        return kept_line(self.kept(), what, self.parts)

    def merge(self, key, order: list) -> list[dict]:
        """The output: the records whose ``key(record)`` is in ``order``, in that order, each once;
        the parts, now in it, are removed. Returns the records."""
        by_key = {key(record): record for record in self.records()}
        merged = [by_key[k] for k in order if k in by_key]
        write_atomically(self.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
        shutil.rmtree(self.parts, ignore_errors=True)
        return merged


def kept_line(count: int, what: str, where: Path) -> str:
    """``kept N <what> in <where>; continue with --resume``, or that nothing was kept."""
    return f"kept {count} {what} in {where}; continue with --resume" if count else f"no {what} finished; nothing kept"


def run_facts(command: list[str] | None = None, **facts) -> dict:
    """What produced a result: motab's version, the command (default: this process's), then ``facts``
    (the models, the data, the settings)."""
    from motab import __version__

    return dict(motab=__version__, command=list(sys.argv if command is None else command)) | facts


def write_run_record(path: Path, **facts) -> None:
    """``path`` (JSON): ``run_facts(**facts)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(run_facts(**facts), indent=1, default=str))
