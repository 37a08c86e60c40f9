"""Strict configs: unknown keys and wrong types are named; overrides; every YAML recipe loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cheers.config import (
    FLAVOURS,
    ModelConfig,
    flavour,
    from_dict,
    load_yaml,
    model_config_from_dict,
    parse_overrides,
    recipe_names,
    recipe_path,
    to_dict,
)
from cheers.errors import ConfigError
from cheers.train.config import load_run_config

CONFIGS = Path(__file__).parent.parent / "configs"


def test_flavours_round_trip_through_json():
    assert {"debug", "shapes", "cheers-1.5b"} <= set(FLAVOURS)
    for name in FLAVOURS:
        cfg = flavour(name)
        assert cfg.flavour == name
        again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg))))
        assert again == cfg
        assert model_config_from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg  # as a checkpoint reloads


@pytest.mark.parametrize("name", ["shape", "Shapes", "cheers-1.5"])
def test_an_unknown_flavour_is_refused_with_the_valid_ones(name):
    """A misspelt flavour must not fall back to the default (cheers-1.5b-sized) config."""
    for build in (lambda: model_config_from_dict({"flavour": name}),
                  lambda: load_run_config(None, [f"model.flavour={name}"])):
        known = ", ".join(sorted(FLAVOURS))
        with pytest.raises(ConfigError, match=re.escape(f"unknown flavour '{name}'; known: {known}")):
            build()
    # "custom" names no base: every key as given
    assert model_config_from_dict({"flavour": "custom"}) == ModelConfig()


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key model\.llm\.hiden_size"):
        model_config_from_dict({"flavour": "debug", "llm": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match=r"model\.llm\.num_hidden_layers: expected an integer, got 'two'"):
        model_config_from_dict({"flavour": "debug", "llm": {"num_hidden_layers": "two"}})
    with pytest.raises(ConfigError, match=r"unknown flavour 'nope'"):
        flavour("nope")


def test_dotted_overrides():
    over = parse_overrides(["llm.hidden_size=64", "head.stage_b_positions=raster", "transport.cfg_scale=3"])
    cfg = model_config_from_dict({"flavour": "debug", **over})
    assert cfg.llm.hidden_size == 64 and cfg.head.stage_b_positions == "raster"
    assert cfg.transport.cfg_scale == 3.0
    assert parse_overrides(["train.lr=1e-4"]) == {"train": {"lr": 1e-4}}  # YAML 1.1 would say "1e-4"
    assert parse_overrides(["train.out_dir=runs/a1"]) == {"train": {"out_dir": "runs/a1"}}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["llm.hidden_size"])


def test_inconsistent_dimensions_are_refused():
    with pytest.raises(ConfigError, match="image_size=72 is not a multiple"):
        model_config_from_dict({"flavour": "debug", "tokenizer": {"image_size": 72}})


RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_the_recipes_include_every_flavour():
    named = {load_yaml(p).get("model", {}).get("flavour") for p in RECIPES}
    assert set(FLAVOURS) <= named, f"flavours without a recipe: {set(FLAVOURS) - named}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_whole_and_round_trips(path):
    data = load_yaml(path)
    assert isinstance(data.get("model"), dict), f"{path.name} has no model: section"
    assert data["model"].get("flavour") in FLAVOURS, f"{path.name}: model.flavour must name a flavour"
    run = load_run_config(path)  # every section, strict keys
    model = run.model
    assert model.flavour == data["model"]["flavour"]
    assert model_config_from_dict(data["model"]) == model
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(model)))) == model
    assert model_config_from_dict(json.loads(json.dumps(to_dict(model)))) == model


def test_recipes_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    """The shipped recipes are package data: a name (or the README's configs/NAME.yaml) finds
    the same file from a folder that holds no configs/, as after a wheel install."""
    assert recipe_names() == sorted(p.stem for p in RECIPES)
    monkeypatch.chdir(tmp_path)
    for name in recipe_names():
        want = load_yaml(CONFIGS / f"{name}.yaml")
        for spelling in (name, f"{name}.yaml", f"configs/{name}.yaml"):
            assert load_yaml(recipe_path(spelling)) == want
    assert load_run_config("debug").model.flavour == "debug"
    own = tmp_path / "shapes"  # an existing file wins over a shipped name
    own.write_text("model: {flavour: debug}\n")
    assert recipe_path("shapes") == Path("shapes")
    with pytest.raises(ConfigError, match=r"config file not found: debg \(nor a shipped recipe: the names are .*debug, .*shapes"):
        load_run_config("debg")
    with pytest.raises(ConfigError, match=r"config file not found: elsewhere/debug.yaml"):
        recipe_path("elsewhere/debug.yaml")


def test_removed_transport_options_load_only_at_their_old_defaults():
    """config.json files written before flow_loss_weight and the logit-normal times were removed
    still load when they hold the values that behave as now; other values are refused by name."""
    old = to_dict(flavour("debug"))
    old["transport"].update(flow_loss_weight=1.0, logit_normal_mean=0.0, logit_normal_std=1.0)
    assert model_config_from_dict(old) == flavour("debug")
    old["transport"]["flow_loss_weight"] = 0.5
    with pytest.raises(ConfigError, match=r"model\.transport\.flow_loss_weight was removed; only 1\.0"):
        model_config_from_dict(old)
    with pytest.raises(ConfigError, match=r"time_sampling"):
        model_config_from_dict({"flavour": "debug", "transport": {"time_sampling": "logit_normal"}})
