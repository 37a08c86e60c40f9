"""Strict configs: unknown keys and wrong types are named; overrides; every YAML recipe loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cheers.config import (
    ModelConfig,
    flavour,
    from_dict,
    load_yaml,
    model_config_from_dict,
    parse_overrides,
    to_dict,
)
from cheers.errors import ConfigError

CONFIGS = Path(__file__).parent.parent / "configs"


def test_flavours_round_trip_through_json():
    for name in ("debug", "cheers-1.5b"):
        cfg = flavour(name)
        again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg))))
        assert again == cfg


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


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_has_a_valid_model_section(path):
    data = load_yaml(path)
    if "model" in data:
        model_config_from_dict(data["model"])
