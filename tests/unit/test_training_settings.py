"""The `training` settings section: `recsys train --set`, config files and the mapping by
name into the model's dataclass configs."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from recsys_core.errors import SettingsError
from recsys_core.settings import TrainingSettings, load_settings, with_overrides
from recsys_models.data import EncoderSpec
from recsys_models.errors import UnknownTrainingKeyError
from recsys_models.ranker import RankerConfig
from recsys_models.train import TrainConfig
from recsys_models.two_tower import TwoTowerConfig
from recsys_models.workflow import RANKER_PREFIX, training_config


def test_every_training_key_names_a_field_of_exactly_one_config() -> None:
    """A field renamed in the model code fails here, not silently in a user's run."""
    targets = {"TrainConfig": {f.name for f in fields(TrainConfig)} - {"two_tower", "ranker"},
               "TwoTowerConfig": {f.name for f in fields(TwoTowerConfig)},
               "EncoderSpec": {f.name for f in fields(EncoderSpec)},
               "RankerConfig": {RANKER_PREFIX + f.name for f in fields(RankerConfig)}}
    for key in TrainingSettings.model_fields:
        owners = [name for name, names in targets.items() if key in names]
        assert len(owners) == 1, f"training.{key} maps to {owners or 'no config'}"


def test_set_values_reach_the_dataclasses_and_unset_keep_their_defaults() -> None:
    s = with_overrides(load_settings("local"), [
        "epochs=3", "temperature=0.05", "training.dim=48", "ranker_negatives=4",
        "use_item_age=false", "history_length=10", "evaluation.holdout=per-user"])
    cfg, spec = training_config(s)
    assert (cfg.epochs, cfg.two_tower.temperature, cfg.two_tower.dim) == (3, 0.05, 48)
    assert cfg.ranker.negatives == 4 and spec == {"use_item_age": False, "history_length": 10}
    assert cfg.patience == TrainConfig().patience  # unset: the dataclass default
    assert cfg.two_tower.id_dim == TwoTowerConfig().id_dim
    assert s.evaluation.holdout == "per-user"


@pytest.mark.parametrize(("assignment", "message"), [
    ("temprature=0.1", "unknown setting 'training.temprature'"),
    ("temperature=-1", "invalid setting 'training.temperature' = -1"),
    ("epochs=many", "invalid setting 'training.epochs' = 'many'"),
    ("evaluation.holdout=random", "invalid setting 'evaluation.holdout'"),
    ("epochs", "expected KEY=VALUE"),
])
def test_bad_assignments_fail_in_one_line_naming_the_key(assignment: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")) as err:
        with_overrides(load_settings("local"), [assignment])
    assert "\n" not in str(err.value)


def test_a_config_file_and_the_environment_set_the_same_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ml.yaml"
    config.write_text("training:\n  temperature: 0.05\n  ranker_negatives: 4\n")
    monkeypatch.setenv("RECSYS_TRAINING__EPOCHS", "5")
    s = load_settings("local", config)
    assert s.training.overrides() == {"temperature": 0.05, "ranker_negatives": 4, "epochs": 5}
    config.write_text("training:\n  temprature: 0.05\n")
    with pytest.raises(SettingsError, match="unknown setting 'training.temprature'"):
        load_settings("local", config)


def test_a_key_no_config_has_is_refused_by_the_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    s = with_overrides(load_settings("local"), ["dim=48"])
    monkeypatch.setattr(TrainingSettings, "overrides", lambda self: {"dimm": 48})
    with pytest.raises(UnknownTrainingKeyError, match="training.dimm"):
        training_config(s)


def test_recsys_train_refuses_a_misspelt_knob_before_training() -> None:
    from typer.testing import CliRunner

    from recsys_platform.cli import app

    result = CliRunner().invoke(app, ["train", "--set", "temprature=0.05"])
    assert isinstance(result.exception, SettingsError)
    assert str(result.exception) == ("unknown setting 'training.temprature' (remove it or "
                                     "check its spelling)")
