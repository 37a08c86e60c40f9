"""The WebDataset pipeline: shard lists, mixing, per-rank sharding, exact resume, bad data."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cheers.train.config import DataConfig
from cheers.train.data import DataError, SampleLoader, expand_shards, load_image, read_shard_records

TASK_CYCLE = ("t2i", "i2t", "t2i", "text")


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int = 4, per_shard: int = 8, *, prefix: str = "shard",
                 tasks: tuple[str, ...] = TASK_CYCLE, corrupt: bool = False) -> str:
    """Tiny shards in the training schema (image + JSON per key); returns a brace pattern over them.

    With ``corrupt``, shard 0 gets an undecodable PNG (first t2i sample) and shard 1 a
    malformed JSON (its second sample).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{prefix}-{s:03d}.tar")) as sink:
            for i in range(per_shard):
                task = tasks[i % len(tasks)]
                meta = {"task": task, "text": f"caption {s} {i}", "width": 40, "height": 24,
                        "conversations": [{"from": "human", "value": f"what is {s}.{i}?"},
                                          {"from": "gpt", "value": f"it is {s}.{i}"}]
                        if task == "i2t" else []}
                rec = {"__key__": f"s{s:03d}_{i:04d}", "json": json.dumps(meta).encode()}
                if task != "text":
                    rec["png"] = png_bytes((30 * s % 256, 25 * i % 256, 128))
                if corrupt and s == 0 and i == 0:
                    rec["png"] = b"\x89PNG\r\n\x1a\n this is not a png"
                if corrupt and s == 1 and i == 1:
                    rec["json"] = b'{"task": "i2t", "text": '
                sink.write(rec)
    return str(folder / f"{prefix}-{{000..{n_shards - 1:03d}}}.tar")


def keys(samples) -> list[str]:
    return [s.key for s in samples]


def test_expand_shards_and_clear_errors(tmp_path):
    pattern = write_shards(tmp_path, n_shards=3, per_shard=2)
    assert [Path(p).name for p in expand_shards([pattern])] == [
        "shard-000.tar", "shard-001.tar", "shard-002.tar"]
    assert len(expand_shards([str(tmp_path / "*.tar")])) == 3
    with pytest.raises(DataError, match=r"shard not found: .*shard-003\.tar .*shard-\{000\.\.003\}"):
        expand_shards([str(tmp_path / "shard-{000..003}.tar")])
    with pytest.raises(DataError, match=r"no shard matches .*nothing-\*\.tar"):
        expand_shards([str(tmp_path / "nothing-*.tar")])
    with pytest.raises(DataError, match="data.shards is empty"):
        expand_shards([])


def test_resize_and_centre_crop():
    # 60x20: left third red, middle green, right blue -> the centre crop is all green
    im = Image.new("RGB", (60, 20), (255, 0, 0))
    im.paste((0, 255, 0), (20, 0, 40, 20))
    im.paste((0, 0, 255), (40, 0, 60, 20))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    x = load_image(buf.getvalue(), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    centre = x[:, :, 4:12]
    assert torch.allclose(centre, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand_as(centre), atol=0.02)


def test_mixing_follows_ratios_and_seed(tmp_path):
    pattern = write_shards(tmp_path, n_shards=4, per_shard=16)
    cfg = DataConfig(shards=[pattern], ratios={"t2i": 3, "i2t": 6, "text": 1}, shuffle_buffer=8,
                     num_workers=0)
    loader = SampleLoader(cfg, image_size=16, seed=1)
    samples = loader.next_batch(500)
    counts = collections.Counter(s.task for s in samples)
    assert abs(counts["t2i"] / 500 - 0.3) < 0.07
    assert abs(counts["i2t"] / 500 - 0.6) < 0.07
    assert abs(counts["text"] / 500 - 0.1) < 0.05
    for s in samples:
        assert (s.image is None) == (s.task == "text")
        if s.image is not None:
            assert s.image.shape == (3, 16, 16)
        if s.task == "i2t":
            assert s.conversations[0]["from"] == "human"
    again = SampleLoader(cfg, image_size=16, seed=1).next_batch(50)
    other = SampleLoader(cfg, image_size=16, seed=2).next_batch(50)
    assert keys(again) == keys(samples[:50])
    assert keys(other) != keys(samples[:50])
    # a shuffled stream still visits every t2i sample once per epoch
    t2i_only = DataConfig(shards=[pattern], ratios={"t2i": 1}, shuffle_buffer=8, num_workers=0)
    epoch = keys(SampleLoader(t2i_only, image_size=16).next_batch(32))
    assert len(set(epoch)) == 32


def test_ranks_split_the_data_and_match_one_process(tmp_path):
    pattern = write_shards(tmp_path, n_shards=4, per_shard=8)
    cfg = DataConfig(shards=[pattern], ratios={"t2i": 1, "i2t": 1}, num_streams=2,
                     shuffle_buffer=4, num_workers=0)
    one = SampleLoader(cfg, image_size=16, rank=0, world_size=1)
    ranks = [SampleLoader(cfg, image_size=16, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # six steps of a global batch of 4
        single = keys(one.next_batch(4))
        split = [keys(r.next_batch(2)) for r in ranks]
        assert sorted(single) == sorted(split[0] + split[1])
        assert not set(split[0]) & set(split[1])
    # the ranks read disjoint shards
    shards = [{k.split("_")[0] for k in keys(r.next_batch(40))} for r in ranks]
    assert not shards[0] & shards[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_samples(tmp_path, workers):
    pattern = write_shards(tmp_path, n_shards=3, per_shard=10, corrupt=True)
    cfg = DataConfig(shards=[pattern], ratios={"t2i": 2, "i2t": 1, "text": 1}, shuffle_buffer=7,
                     num_workers=workers, num_streams=1)
    ref = SampleLoader(cfg, image_size=16, seed=3)
    reference = ref.next_batch(80)
    for cut in (1, 13, 37):
        first = SampleLoader(cfg, image_size=16, seed=3)
        head = first.next_batch(cut)
        state = json.loads(json.dumps(first.state_dict()))  # must survive serialisation
        first.close()
        second = SampleLoader(cfg, image_size=16, seed=3)
        second.load_state_dict(state)
        tail = second.next_batch(80 - cut)
        assert keys(head + tail) == keys(reference)
        for a, b in zip(tail, reference[cut:]):
            assert (a.image is None and b.image is None) or torch.equal(a.image, b.image)
        assert second.skipped == ref.skipped  # counters continue from the state
        second.close()
    ref.close()


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    pattern = write_shards(tmp_path, n_shards=2, per_shard=4, corrupt=True)
    # one more shard: a t2i sample without an image and one whose text is not a string
    with wds.TarWriter(str(tmp_path / "extra.tar")) as sink:
        sink.write({"__key__": "noimg", "json": json.dumps({"task": "t2i", "text": "x"}).encode()})
        sink.write({"__key__": "badtext", "json": json.dumps({"task": "t2i", "text": 3}).encode(),
                    "png": png_bytes((1, 2, 3))})
        sink.write({"__key__": "fine", "json": json.dumps({"task": "t2i", "text": "ok"}).encode(),
                    "png": png_bytes((1, 2, 3))})
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar file at all" * 40)
    cfg = DataConfig(shards=[pattern, str(tmp_path / "extra.tar"), str(tmp_path / "broken.tar")],
                     ratios={"t2i": 1}, shuffle_buffer=0, num_workers=1, shuffle_shards=False,
                     num_streams=1)
    loader = SampleLoader(cfg, image_size=16)
    with caplog.at_level("WARNING", logger="cheers.train.data"):
        got = loader.next_batch(5)  # the 4 good t2i samples of an epoch, and one more
    assert keys(got) == ["s000_0002", "s001_0000", "s001_0002", "fine", "s000_0002"]
    # the second epoch meets the corrupt image again before its first good sample
    assert dict(loader.skipped) == {"bad_image": 2, "bad_json": 1, "missing_image": 1,
                                    "bad_fields": 1, "bad_shard": 1}
    assert "s000_0000 (bad_image)" in caplog.text and "s001_0001 (bad_json)" in caplog.text
    loader.close()


def test_empty_dataset_and_too_few_shards(tmp_path):
    pattern = write_shards(tmp_path, n_shards=2, per_shard=3, tasks=("text",))
    cfg = DataConfig(shards=[pattern], ratios={"t2i": 1, "text": 1}, num_workers=0, num_streams=1)
    with pytest.raises(DataError, match=r"no usable t2i sample in the 2 shard\(s\)"):
        SampleLoader(cfg, image_size=16).next_batch(20)
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    cfg = DataConfig(shards=[str(empty)], ratios={"text": 1}, num_workers=0)
    with pytest.raises(DataError, match="no usable text sample"):
        SampleLoader(cfg, image_size=16).next_batch(1)
    cfg = DataConfig(shards=[pattern], ratios={"text": 1}, num_streams=4)
    with pytest.raises(DataError, match=r"2 shard\(s\) for 4 data streams"):
        SampleLoader(cfg, image_size=16, rank=0, world_size=4)


def test_task_shards_and_image_statistics(tmp_path):
    t2i = write_shards(tmp_path / "a", n_shards=2, per_shard=4, tasks=("t2i",))
    text = write_shards(tmp_path / "b", n_shards=2, per_shard=4, tasks=("text",))
    cfg = DataConfig(shards=[], task_shards={"t2i": [t2i], "text": [text]},
                     ratios={"t2i": 1, "text": 1}, num_workers=0)
    got = SampleLoader(cfg, image_size=8).next_batch(40)
    assert {s.task for s in got} == {"t2i", "text"}
    img = np.stack([s.image.numpy() for s in got if s.image is not None])
    assert img.shape[1:] == (3, 8, 8) and img.max() <= 1.0


def test_read_shard_records_gives_each_json_in_file_order(tmp_path):
    write_shards(tmp_path, n_shards=2, per_shard=3, corrupt=True)
    records = list(read_shard_records(tmp_path / "shard-000.tar"))
    assert [k for k, _ in records] == ["s000_0000", "s000_0001", "s000_0002"]
    assert [r["text"] for _, r in records] == ["caption 0 0", "caption 0 1", "caption 0 2"]
    with pytest.raises(DataError, match=r"shard-001.tar: sample 's001_0001' has a .json member that is not JSON"):
        list(read_shard_records(tmp_path / "shard-001.tar"))
