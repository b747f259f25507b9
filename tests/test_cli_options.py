"""`rmflow train` / `rmflow promote` options come from the config models: one flag per field,
its description as help, overrides applied over --config and --set."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rmcore.config import GateConfig, RunConfig, load_run_config
from rmflow.cli import app
from rmflow.options import config_parameters, flag_of, leaf_fields, parse_sets


def test_every_run_config_field_is_a_train_flag_with_its_description_as_help():
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    for dotted, field in leaf_fields(RunConfig):
        assert f"--{flag_of(dotted, field)}" in out, dotted
    assert "--loss" in out and "--gpu" in out and "plackett_luce" in out  # the `cli` names and enum choices
    assert set(config_parameters(GateConfig)) == set(GateConfig.model_fields)


def test_flags_override_the_config_file_and_set_overrides_anything(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("loss: {name: kwise}\noptim: {lr: 0.001, epochs: 2}\n")
    overrides = {"optim.lr": 0.01, **parse_sets(["scale.workers=3", "strength.strategy=flip+margin", "model.lora_r=8"])}
    cfg = load_run_config(cfg_file, overrides)
    assert (cfg.loss.name, cfg.optim.lr, cfg.optim.epochs, cfg.scale.workers) == ("kwise", 0.01, 2, 3)
    assert cfg.strength.strategy == "flip+margin" and cfg.model.lora_r == 8
    with pytest.raises(ValueError, match="section.field=value"):
        parse_sets(["workers"])
    with pytest.raises(ValueError):
        load_run_config(None, {"optim.nonsense": 1})


def test_a_bad_value_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--loss", "hinge"])
    assert result.exit_code != 0 and "invalid run config" in result.output and "loss.name" in result.output
