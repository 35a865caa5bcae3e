"""motab.checkpoint on its own, without a training loop: the atomic write and ``latest``, the fit
check that refuses another student (naming the parameter, one line) and the resume warnings' scope."""

from __future__ import annotations

import pytest

from motab.checkpoint import changed_settings, check_fits, save_atomically, save_student
from motab.config import ConfigError
from tests.test_trainer import tiny


def test_a_save_renames_its_folder_into_place_then_points_latest_at_it(tmp_path):
    seen = []

    def write_part(folder):
        seen.append(folder.name)
        (folder / "part.txt").write_text("written")

    final = save_atomically(tmp_path, 3, write_part, rank=0, world=1)
    assert seen == [".checkpoint-3.tmp"]  # written where a kill leaves nothing that looks saved
    assert final == tmp_path / "checkpoint-3" and (final / "part.txt").read_text() == "written"
    assert (tmp_path / "latest").read_text() == "checkpoint-3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "latest"]


def test_a_save_cut_short_leaves_the_previous_checkpoint(tmp_path):
    save_atomically(tmp_path, 1, lambda folder: None, rank=0, world=1)

    def write_part(folder):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_atomically(tmp_path, 2, write_part, rank=0, world=1)
    assert (tmp_path / "latest").read_text() == "checkpoint-1" and not (tmp_path / "checkpoint-2").exists()


@pytest.fixture
def saved(tmp_path):
    """A checkpoint folder holding the student of ``tiny(0, 32, 1)``."""
    save_student(tmp_path / "student", tiny(0, 32, 1), None)
    return tmp_path


def test_the_student_that_wrote_it_fits(saved):
    check_fits(saved, tiny(5, 32, 1), sharded=False)  # other values, same names and shapes


@pytest.mark.parametrize(
    "student, expected",
    [
        (lambda: tiny(0, 48, 1), "lm_head.weight is [64, 32] there and [64, 48] in the student"),
        (lambda: tiny(0, 32, 2), "it lacks model.layers.1."),
    ],
    ids=["wider", "deeper"],
)
def test_another_student_is_refused_naming_the_parameter(saved, student, expected):
    with pytest.raises(ConfigError) as error:
        check_fits(saved, student(), sharded=False)
    message = str(error.value)
    assert message.startswith(f"checkpoint {saved} does not fit the student: ") and expected in message
    assert "\n" not in message


def test_a_shallower_student_is_refused_naming_what_it_lacks(tmp_path):
    save_student(tmp_path / "student", tiny(0, 32, 2), None)
    with pytest.raises(ConfigError, match=r"it has model\.layers\.1\.\S+, the student not"):
        check_fits(tmp_path, tiny(0, 32, 1), sharded=False)


def test_a_tied_head_saved_once_fits(tmp_path):
    save_student(tmp_path / "student", tiny(0, 32, 1, tied=True), None)
    check_fits(tmp_path, tiny(1, 32, 1, tied=True), sharded=False)


def test_a_replicated_checkpoint_is_refused_to_a_sharded_run(saved):
    with pytest.raises(ConfigError, match="written without FSDP sharding and this run shards the student"):
        check_fits(saved, tiny(0, 32, 1), sharded=True)


def test_where_a_run_reports_is_no_setting_to_warn_of():
    saved = {"learning_rate": 1e-3, "output_dir": "a", "rollout": {"draft_len": 4}}  # older: no report_to
    now = {"learning_rate": 2e-3, "output_dir": "b", "report_to": "tensorboard", "rollout": {"draft_len": 8}}
    assert changed_settings(saved, now) == [
        "train.learning_rate changed from 0.001 in the checkpoint to 0.002",
        "rollout.draft_len changed from 4 in the checkpoint to 8",
    ]
