"""Safetensors / JSON reading and writing, sharded folders, and strict checked loading."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cheers.errors import CheckpointError
from cheers.safetensors_io import (
    load_checked,
    read_json,
    read_safetensors,
    read_state_dict,
    write_json,
    write_safetensors,
    write_state_dict,
)


class Tiny(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 3)
        self.head = nn.Linear(4, 10, bias=False)
        self.register_buffer("scale", torch.ones(3))
        if tied:
            self.head.weight = self.emb.weight


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in Tiny().state_dict().items()}


# --------------------------------------------------------------------------- files


def test_safetensors_roundtrip_atomic_and_shared(tmp_path):
    base = torch.randn(4, 4)
    state = {"a": base, "b": base, "c": base.t(), "d": torch.arange(5)}  # shared + non-contiguous
    path = tmp_path / "sub" / "x.safetensors"
    write_safetensors(state, path, metadata={"note": "hi"})
    back = read_safetensors(path)
    assert torch.equal(back["a"], base) and torch.equal(back["b"], base)
    assert torch.equal(back["c"], base.t()) and back["d"].dtype == torch.int64
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no temp file left


def test_truncated_safetensors_names_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated .*needs 16384 bytes"):
        read_safetensors(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        read_safetensors(path)
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_safetensors(path)
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: file not found"):
        read_safetensors(tmp_path / "nope.safetensors")


def test_corrupt_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON: .* line 4"):
        read_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        read_json(path)
    write_json({"x": [1, 2]}, path)
    assert read_json(path) == {"x": [1, 2]}


def test_sharded_folder_roundtrip_and_missing_shard(tmp_path):
    state = {f"layer{i}.weight": torch.randn(16, 16) for i in range(5)}
    files = write_state_dict(state, tmp_path, max_shard_bytes=2 * 16 * 16 * 4)
    assert len(files) == 4  # 3 shards + the index
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 16 * 16 * 4
    back = read_state_dict(tmp_path)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard file .*model-00002-of-00003\.safetensors is missing"):
        read_state_dict(tmp_path)


def test_empty_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        read_state_dict(tmp_path)


# --------------------------------------------------------------------------- load_checked


def test_load_checked_loads_everything_and_keeps_dtype():
    model = Tiny().to(torch.float64)
    state = _state()
    report = load_checked(model, state, source="ckpt/model.safetensors")
    assert report.ok and "proj.weight" in report.loaded
    assert model.proj.weight.dtype == torch.float64
    torch.testing.assert_close(model.proj.weight, state["proj.weight"].double())


def test_load_checked_lists_missing_unexpected_misshaped():
    state = _state()
    del state["proj.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["head.weight"] = torch.zeros(10, 5)
    model = Tiny()
    before = model.emb.weight.clone()
    with pytest.raises(CheckpointError) as err:
        load_checked(model, state, source="ckpt/model.safetensors")
    msg = str(err.value)
    assert msg.startswith("ckpt/model.safetensors: checkpoint does not fit the Tiny")
    assert "missing: proj.bias" in msg
    assert "unexpected: extra.weight" in msg
    assert "mis-shaped: head.weight (expected [10, 4], found [10, 5])" in msg
    assert torch.equal(model.emb.weight, before)  # nothing copied before the check


def test_load_checked_non_strict_loads_what_fits():
    state = _state()
    state["head.weight"] = torch.zeros(3, 3)
    model = Tiny()
    head = model.head.weight.clone()
    report = load_checked(model, state, source="x", strict=False)
    assert not report.ok and report.mismatched == [("head.weight", (10, 4), (3, 3))]
    assert torch.equal(model.emb.weight, state["emb.weight"])
    assert torch.equal(model.head.weight, head)


def test_load_checked_tied_weight_may_be_stored_once_or_twice():
    state = _state()
    for drop_head in (True, False):
        model = Tiny(tied=True)
        s = dict(state)
        s["head.weight"] = s["emb.weight"]
        if drop_head:
            del s["head.weight"]
        assert load_checked(model, s, source="x").ok
        assert model.head.weight is model.emb.weight
        assert torch.equal(model.head.weight, state["emb.weight"])
