"""What every benchmark shares: its command line (device and output folder), the card's name,
the facts every result carries, and how the results are written (JSON + a markdown table)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date, datetime, timezone
from pathlib import Path

import torch

_STARTED = time.perf_counter()


def stage(message: str) -> None:
    """Prints a progress line stamped with the UTC time and the seconds since the benchmark
    started, at once (a run cut off by its time limit still shows how far it got)."""
    now = datetime.now(timezone.utc)
    print(f"[{now:%H:%M:%S} +{time.perf_counter() - _STARTED:6.1f}s] {message}", flush=True)


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the benchmark's docstring and ``--device`` / ``--out``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/out", help="folder for the JSON and markdown results")
    return parser


def parse_bench_args(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, torch.device]:
    """The parsed arguments and the device they name."""
    args = parser.parse_args(argv)
    return args, torch.device(args.device)


def card_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (a CPU timing is never a GPU claim)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def machine_load() -> dict:
    """The host's load averages (1, 5 and 15 minutes) and its CPU count: a CPU timing is only
    comparable with another taken under the same load."""
    one, five, fifteen = os.getloadavg()
    return dict(load_1min=one, load_5min=five, load_15min=fifteen, cpus=os.cpu_count())


def run_facts(device: torch.device, **extra) -> dict:
    """What every result records: the card, the date, torch's version, the host's load when the
    result is written, plus ``extra``."""
    return dict(card=card_name(device), date=str(date.today()), torch=torch.__version__, **machine_load(), **extra)


def write_results(out: str | Path, stem: str, record: dict, markdown: str) -> None:
    """``<out>/<stem>.json`` and ``<out>/<stem>.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    print(f"# wrote {out / stem}.json and {stem}.md")
