"""The README's table of YAML options is the one the config dataclasses generate."""

import json
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import get_type_hints

from motab.config import (
    REFERENCE_BEGIN,
    REFERENCE_END,
    SECTION_CLASSES,
    TOP_LEVEL,
    reference_table,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_holds_the_generated_reference_table():
    text = README.read_text(encoding="utf-8")
    assert text.count(REFERENCE_BEGIN) == 1 and text.count(REFERENCE_END) == 1
    shown = text.split(REFERENCE_BEGIN)[1].split(REFERENCE_END)[0]
    # regenerate with: the README's text between the markers = "\n" + reference_table()
    assert shown == "\n" + reference_table()


def test_the_table_has_every_option_with_its_default():
    table = reference_table()
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    options = {(row[0].lstrip("| "), row[1].strip("`")): row for row in rows}
    for key in TOP_LEVEL:
        assert ("(top level)", key) in options
    for section, cls in SECTION_CLASSES.items():
        name = "student_sampling, teacher_sampling" if section.endswith("_sampling") else section
        hints = get_type_hints(cls)
        for f in fields(cls):
            if is_dataclass(hints[f.name]):
                continue
            row = options[(name, f.name)]
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            assert json.loads(row[3].strip("`")) == default, f"{section}.{f.name}"
            assert row[4].strip(" |"), f"{section}.{f.name} has no meaning"
