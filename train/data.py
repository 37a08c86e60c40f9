"""WebDataset shards -> task-mixed, per-rank, exactly resumable streams of ``RawSample``.

Layout of the stream (one rank, one logical stream ``s``)::

    shards --expand--> a seeded split: every num_streams-th shard goes to stream s,
                       read in a new order each epoch
           --per task--> _TaskStream: reads the shards, keeps samples of its task,
                         shuffles windows of ``shuffle_buffer`` samples
           --mix-------> _MixedStream: a seeded sampler picks the task of each sample
           --decode----> _StreamReader: JPEG/PNG decode, resize + centre crop (threads)

``SampleLoader`` hands rank ``r`` of ``w`` the logical streams ``r, r + w, ...`` and
takes samples from them round-robin. With ``num_streams`` fixed, a step's global batch
holds the same samples on any number of ranks.

Every position is a handful of integers plus the sampler's RNG state, attached to each
sample as it is read, so ``state_dict()`` is the position right after the last sample
handed out, whatever the decode threads have read ahead. Shards are local tar files read
with ``tarfile`` (random access inside a shard keeps the shuffle window cheap to rebuild);
``data.jsonl`` files are checked at start-up and read as slices with a shard's interface
(``train/jsonl.py``).

Record: ``{key}.png|jpg|jpeg|webp`` + ``{key}.json`` with ``task`` (``t2i`` | ``i2t`` |
``text``), ``text``, ``conversations`` (i2t), ``width``, ``height``; a chat about several
images names its members in ``images`` (``{key}.0.png``, ``{key}.1.jpg``, ...).
``cheers data pack`` writes such shards from JSONL (``cheers.data_format``).
A malformed record, an undecodable image or an unreadable shard is skipped, counted by
reason and logged; it never stops the run.
"""

from __future__ import annotations

import collections
import copy
import glob
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

from cheers.data_format import TarShard, image_members
from cheers.errors import InputError
from cheers.images import square_tensor

from .config import TASKS, DataConfig

log = logging.getLogger("cheers.train.data")

SKIP_REASONS = ("bad_json", "bad_fields", "missing_image", "bad_image", "bad_shard")
_LOG_FIRST = 10  # per reason, then every _LOG_EVERY-th, so a bad shard cannot flood the log
_LOG_EVERY = 1000
_MAX_CONSECUTIVE_SKIPS = 10_000  # a stream of nothing but bad samples is an error, not a loop


class DataError(InputError):
    """The data cannot be used at all: a missing shard, no match, no usable sample."""


@dataclass
class RawSample:
    """One decoded sample, before tokenisation.

    ``image`` is ``[3, H, W]`` float in [0, 1] at the configured resolution, ``None`` for
    text samples; ``extra_images`` the further images of a chat about several, same shape.
    ``conversations`` are the i2t turns (``[{"from"|"role": .., "value"|"content": ..}]``).
    """

    key: str
    task: Literal["t2i", "i2t", "text"]
    text: str
    conversations: list[dict]
    image: torch.Tensor | None
    extra_images: list[torch.Tensor] = field(default_factory=list)

    @property
    def images(self) -> list[torch.Tensor]:
        """Every image in order (none for text samples)."""
        return [] if self.image is None else [self.image, *self.extra_images]


# --------------------------------------------------------------------------- shard lists


MAKE_SHARDS = ("`cheers data pack --jsonl FILE --out DIR` makes shards of your data, "
               "`python -m cheers.shapes.dataset --out DIR` those of the shapes world")


def expand_shards(patterns: list[str], what: str = "data.shards") -> list[str]:
    """Brace-expand and glob ``patterns`` into existing shard paths, in order.

    Raises DataError naming the missing path, the pattern that matched nothing, or the
    empty list.
    """
    if not patterns:
        raise DataError(f"{what} is empty: give at least one shard path or pattern")
    paths: list[str] = []
    for pattern in patterns:
        for path in braceexpand(pattern):
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise DataError(f"no shard matches {path!r} (from {what} entry {pattern!r}); {MAKE_SHARDS}")
                paths.extend(matches)
            elif not os.path.isfile(path):
                raise DataError(f"shard not found: {path} (from {what} entry {pattern!r}); {MAKE_SHARDS}")
            else:
                paths.append(path)
    return paths


def read_shard_records(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, record)`` of every sample with a ``.json`` member in one shard, in file order,
    read with the training loader's shard index. A ``.json`` that is not JSON raises DataError
    naming the shard and the sample."""
    shard = TarShard(str(path))
    try:
        for key, members in shard.samples:
            if "json" not in members:
                continue
            try:
                record = json.loads(shard.read(members["json"]))
            except ValueError as e:
                raise DataError(f"{path}: sample {key!r} has a .json member that is not JSON ({e})") from None
            yield key, record
    finally:
        shard.close()


# --------------------------------------------------------------------------- records


@dataclass
class _Record:
    """A sample as read from the tar, before image decoding.

    ``skips`` are ``(reason, shard, key, detail)`` met while reading up to this record;
    they are counted when the record is handed out, so counters match the position.
    ``state`` is the mixed stream's position right after this record.
    """

    key: str
    shard: str
    task: str
    meta: dict[str, Any]
    image_infos: list[Any] = field(default_factory=list)  # the image members, read when handed out
    image_bytes: list[bytes] = field(default_factory=list)
    skip: tuple[str, str] | None = None  # (reason, detail) when the record itself is unusable
    skips: list[tuple[str, str, str, str]] = field(default_factory=list)
    state: dict[str, Any] | None = None


def _check_meta(meta: Any) -> str | None:
    """Why ``meta`` breaks the schema, or None."""
    if not isinstance(meta, dict):
        return f"top level is {type(meta).__name__}, not an object"
    if meta.get("task") not in TASKS:
        return f"task {meta.get('task')!r} is not one of {TASKS}"
    text = meta.get("text", "")
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string"
    conv = meta.get("conversations", [])
    if not isinstance(conv, list) or not all(isinstance(c, dict) for c in conv):
        return "conversations is not a list of objects"
    if meta["task"] in ("t2i", "text") and not text:
        return f"{meta['task']} sample without text"
    if meta["task"] == "i2t" and not conv and not text:
        return "i2t sample without conversations or text"
    return None


# --------------------------------------------------------------------------- one task


class _TaskStream:
    """Samples of one task from one logical stream's share of the shards, endlessly.

    The stream owns every ``num_streams``-th shard of a seeded permutation of the shards
    (disjoint from the other streams) and reads them in a new order each epoch. Samples
    of the task are gathered into windows of ``window`` (across shard boundaries) and each
    window is permuted with a seed made of (seed, task, stream, epoch, window index).

    Position: ``epoch``, the window's start (``shard`` index in this epoch's order,
    ``sample`` index inside it), ``window`` index and ``offset`` inside the window.
    Rebuilding the window from its start reproduces it exactly.
    """

    def __init__(self, task: str, paths: list[str], *, stream: int, num_streams: int,
                 seed: int, window: int, shuffle_shards: bool, reports_unknown: bool,
                 what: str, sources: dict[str, Any] | None = None):
        if len(paths) < num_streams:
            raise DataError(
                f"{what}: {len(paths)} shard(s) for {num_streams} data streams; every stream "
                "needs a shard of its own: add shards or lower data.num_streams"
            )
        self.task, self.paths, self.stream, self.num_streams = task, paths, stream, num_streams
        self.seed, self.window_size, self.shuffle_shards = seed, max(1, window), shuffle_shards
        # several tasks may read the same shards: only one counts bad JSON and bad shards
        self.reports_unknown = reports_unknown
        self.what = what
        self.sources = sources or {}  # shard-like slices of data.jsonl files, by their path
        self.task_id = TASKS.index(task)
        self.epoch = self.shard = self.sample = self.window = self.offset = 0
        self._order: list[str] | None = None
        self._buf: list[_Record] | None = None
        self._pending_skips: list[tuple[str, str, str, str]] = []
        self._carry: list[tuple[str, str, str, str]] = []  # skips of windows with no record
        self._next_start = (0, 0)
        self._usable_this_epoch = 0
        self._open: collections.OrderedDict[str, TarShard | None] = collections.OrderedDict()

    # -- position
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample,
                "window": self.window, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.shard, self.sample = state["epoch"], state["shard"], state["sample"]
        self.window, self.offset = state["window"], state["offset"]
        self._order, self._buf, self._carry = None, None, []
        # resuming mid-epoch: samples were found earlier in this epoch
        self._usable_this_epoch = int(any((self.shard, self.sample, self.window, self.offset)))

    # -- reading
    def _epoch_order(self) -> list[str]:
        if self._order is None:
            # a fixed, seeded split of the shards between streams (the same for every task)
            # keeps streams disjoint in every epoch; each epoch reorders a stream's shards
            idx = np.arange(len(self.paths))
            if self.shuffle_shards:
                idx = np.random.default_rng([self.seed]).permutation(idx)
            mine = idx[self.stream::self.num_streams]
            if self.shuffle_shards:
                mine = np.random.default_rng(
                    [self.seed, self.task_id, self.stream, self.epoch]).permutation(mine)
            self._order = [self.paths[i] for i in mine]
        return self._order

    def _shard(self, path: str, skips: list) -> TarShard | None:
        """The open shard (a few stay open for the window), None when unreadable."""
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        try:
            shard: TarShard | None = self.sources[path] if path in self.sources else TarShard(path)
        except (tarfile.TarError, OSError, EOFError) as e:
            if self.reports_unknown:
                skips.append(("bad_shard", path, "", f"{type(e).__name__}: {e}"))
            shard = None
        self._open[path] = shard
        while len(self._open) > 4:
            _, old = self._open.popitem(last=False)
            if old is not None:
                old.close()
        return shard

    def _fill(self) -> None:
        """Read the window that starts at (shard, sample) and permute it."""
        order = self._epoch_order()
        buf: list[_Record] = []
        skips: list[tuple[str, str, str, str]] = []
        si, pos = self.shard, self.sample
        while len(buf) < self.window_size and si < len(order):
            shard = self._shard(order[si], skips)
            n = len(shard.samples) if shard is not None else 0
            while pos < n and len(buf) < self.window_size:
                key, members = shard.samples[pos]
                pos += 1
                rec = self._record(shard, key, members, skips)
                if rec is not None:
                    buf.append(rec)
            if pos >= n:
                si, pos = si + 1, 0
        self._next_start = (si, pos)
        if len(buf) > 1:
            perm = np.random.default_rng(
                [self.seed, self.task_id, self.stream, self.epoch, self.window]).permutation(len(buf))
            buf = [buf[i] for i in perm]
        self._buf = buf
        # skips met while filling ride on the window's first record; when resuming past it
        # they were counted before the checkpoint
        self._pending_skips = self._carry + skips if self.offset == 0 else []
        self._carry = []

    def _record(self, shard: TarShard, key: str, members: dict[str, tarfile.TarInfo],
                skips: list) -> _Record | None:
        """The record of ``key`` if it belongs to this task; bad JSON is noted in ``skips``."""
        if "json" not in members:
            if self.reports_unknown:
                skips.append(("bad_json", shard.path, key, "no .json member"))
            return None
        try:
            meta = json.loads(shard.read(members["json"]))
        except (ValueError, OSError, tarfile.TarError) as e:
            if self.reports_unknown:
                skips.append(("bad_json", shard.path, key, f"{type(e).__name__}: {e}"))
            return None
        if not isinstance(meta, dict) or meta.get("task") not in TASKS:
            if self.reports_unknown:
                skips.append(("bad_json", shard.path, key, _check_meta(meta) or "bad task"))
            return None
        if meta["task"] != self.task:
            return None
        rec = _Record(key=key, shard=shard.path, task=self.task, meta=meta)
        problem = _check_meta(meta)
        if problem is not None:
            rec.skip = ("bad_fields", problem)
        else:
            names = image_members(meta, members)
            if isinstance(names, str):
                rec.skip = ("missing_image", names)
            else:
                rec.image_infos = [members[n] for n in names]
        return rec

    def next(self) -> _Record:
        """The next record of this task (possibly one marked ``skip``)."""
        while True:
            if self._buf is None:
                self._fill()
            if self.offset < len(self._buf):
                rec = copy.copy(self._buf[self.offset])
                self.offset += 1
                rec.skips, self._pending_skips = self._pending_skips, []
                if rec.skip is None:
                    self._usable_this_epoch += 1
                if rec.skip is None and rec.image_infos:
                    self._read_image(rec)
                return rec
            # window used up: move on, or start the next epoch
            self._carry, self._pending_skips = self._pending_skips, []
            si, pos = self._next_start
            if si >= len(self._epoch_order()):
                if self._usable_this_epoch == 0:
                    raise DataError(
                        f"no usable {self.task} sample in the {len(self._epoch_order())} shard(s) "
                        f"of data stream {self.stream} ({self.what}): check the shards' .json "
                        f"'task' fields, or set data.ratios.{self.task}=0"
                    )
                self.epoch, self.shard, self.sample, self.window = self.epoch + 1, 0, 0, 0
                self._order, self._usable_this_epoch = None, 0
            else:
                self.shard, self.sample, self.window = si, pos, self.window + 1
            self.offset, self._buf = 0, None

    def _read_image(self, rec: _Record) -> None:
        shard = self._shard(rec.shard, [])  # an unreadable shard was counted when first opened
        if shard is None:
            rec.skip = ("bad_shard", "the shard became unreadable")
            return
        try:
            rec.image_bytes = [shard.read(info) for info in rec.image_infos]
        except (OSError, tarfile.TarError) as e:
            rec.skip = ("bad_image", f"{type(e).__name__}: {e}")

    def close(self) -> None:
        for shard in self._open.values():
            if shard is not None:
                shard.close()
        self._open.clear()


# --------------------------------------------------------------------------- task mixing


class _MixedStream:
    """One logical stream: a seeded sampler picks each sample's task by ``ratios``."""

    def __init__(self, cfg: DataConfig, stream: int, num_streams: int, seed: int,
                 shard_lists: dict[str, list[str]], sources: dict[str, Any] | None = None):
        self.stream = stream
        total = sum(cfg.ratios.get(t, 0.0) for t in TASKS)
        self.tasks = [t for t in TASKS if cfg.ratios.get(t, 0.0) > 0]
        self.cum = np.cumsum([cfg.ratios[t] / total for t in self.tasks])
        self.rng = np.random.default_rng([seed, 7919, stream])
        reporters: set[tuple[str, ...]] = set()
        self.streams: dict[str, _TaskStream] = {}
        for task in self.tasks:
            paths = shard_lists[task]
            # the first task reading a shard list reports its unreadable JSON
            reports = tuple(paths) not in reporters
            reporters.add(tuple(paths))
            sources_named = [n for n, v in (("data.shards", cfg.shards), ("data.jsonl", cfg.jsonl)) if v]
            what = f"data.task_shards.{task}" if task in cfg.task_shards else \
                " + ".join(sources_named) or "data.shards"
            self.streams[task] = _TaskStream(
                task, paths, stream=stream, num_streams=num_streams, seed=seed,
                window=cfg.shuffle_buffer, shuffle_shards=cfg.shuffle_shards,
                reports_unknown=reports, what=what, sources=sources)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": copy.deepcopy(self.rng.bit_generator.state),
                "tasks": {t: s.state_dict() for t, s in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["tasks"]) != set(self.streams):
            raise DataError(
                f"data position holds tasks {sorted(state['tasks'])}, the config mixes "
                f"{sorted(self.streams)}: data.ratios changed between runs"
            )
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        for task, s in state["tasks"].items():
            self.streams[task].load_state_dict(s)

    def next(self) -> _Record:
        u = self.rng.random()
        task = self.tasks[min(int(np.searchsorted(self.cum, u, side="right")), len(self.tasks) - 1)]
        rec = self.streams[task].next()
        rec.state = self.state_dict()
        return rec

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


# --------------------------------------------------------------------------- decoding


def load_image(data: bytes, size: int) -> torch.Tensor:
    """Decode an encoded image, resize its short side to ``size`` and centre-crop.

    Returns ``[3, size, size]`` float32 in [0, 1]. Raises whatever PIL raises on bad data.
    """
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")  # forces the full decode: truncated files fail here
    return square_tensor(im, size)


def _decode(rec: _Record, size: int) -> RawSample | tuple[str, str]:
    """A RawSample, or ``(reason, detail)`` when the record cannot be used."""
    if rec.skip is not None:
        return rec.skip
    try:
        images = [load_image(data, size) for data in rec.image_bytes]
    except Exception as e:  # PIL raises many types on bad data; all mean "skip it"
        return ("bad_image", f"{type(e).__name__}: {e}")
    return RawSample(key=rec.key, task=rec.task, text=rec.meta.get("text", ""),
                     conversations=list(rec.meta.get("conversations", [])),
                     image=images[0] if images else None, extra_images=images[1:])


class _StreamReader:
    """Decoded samples of one logical stream, decoded ahead by a shared thread pool.

    Yields ``(sample or None, record)``; a ``None`` sample is a skipped record.
    """

    def __init__(self, mixed: _MixedStream, size: int, pool: ThreadPoolExecutor | None, depth: int):
        self.mixed, self.size, self.pool, self.depth = mixed, size, pool, depth
        self.pending: collections.deque[tuple[Future | None, _Record]] = collections.deque()

    def reset(self) -> None:
        for fut, _ in self.pending:
            if fut is not None:
                fut.cancel()
        self.pending.clear()

    def next(self) -> tuple[RawSample | None, _Record, tuple[str, str] | None]:
        while len(self.pending) < max(1, self.depth):
            rec = self.mixed.next()
            fut = self.pool.submit(_decode, rec, self.size) if self.pool is not None else None
            self.pending.append((fut, rec))
        fut, rec = self.pending.popleft()
        out = fut.result() if fut is not None else _decode(rec, self.size)
        if isinstance(out, RawSample):
            return out, rec, None
        return None, rec, out


# --------------------------------------------------------------------------- per rank


class SampleLoader:
    """This rank's endless, exactly resumable stream of ``RawSample`` batches.

    Rank ``rank`` of ``world_size`` reads logical streams ``rank, rank + world_size, ...``
    of ``num_streams`` (``data.num_streams``, 0 = ``world_size``) and takes samples from
    them round-robin. ``state_dict()`` is the position after the last sample returned;
    ``load_state_dict`` continues with exactly the samples that would have come next.
    ``skipped`` counts skipped records by reason (part of the state).

    ``data.jsonl`` files are checked here (``train/jsonl.py``; with ``model``, a ``ModelConfig``,
    and ``data.text_tokenizer_dir`` their token lengths too) and read beside ``data.shards``.
    """

    def __init__(self, cfg: DataConfig, *, image_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, model: Any = None):
        self.num_streams = cfg.num_streams or world_size
        if self.num_streams % world_size:
            raise DataError(
                f"data.num_streams={self.num_streams} is not a multiple of the world size "
                f"{world_size}: every rank must read the same number of streams"
            )
        sources = self._jsonl_sources(cfg, model, report=rank == 0) if cfg.jsonl else {}
        shard_lists = {}
        for t in TASKS:
            if cfg.ratios.get(t, 0.0) <= 0:
                continue
            if t in cfg.task_shards:
                shard_lists[t] = expand_shards(cfg.task_shards[t], f"data.task_shards.{t}")
            else:  # data.shards (which may be empty beside data.jsonl), then the JSONL slices
                tars = expand_shards(cfg.shards, "data.shards") if cfg.shards or not sources else []
                shard_lists[t] = tars + list(sources)
        self.stream_ids = list(range(rank, self.num_streams, world_size))
        self.pool = ThreadPoolExecutor(cfg.num_workers, thread_name_prefix="decode") \
            if cfg.num_workers > 0 else None
        depth = 2 * cfg.num_workers
        self.mixed = {s: _MixedStream(cfg, s, self.num_streams, seed, shard_lists, sources)
                      for s in self.stream_ids}
        self.readers = {s: _StreamReader(m, image_size, self.pool, depth)
                        for s, m in self.mixed.items()}
        self.positions = {s: m.state_dict() for s, m in self.mixed.items()}
        self.rr = 0  # index into stream_ids of the next stream to read
        self.skipped: collections.Counter[str] = collections.Counter()

    def _jsonl_sources(self, cfg: DataConfig, model: Any, report: bool) -> dict[str, Any]:
        from cheers.data_format import LengthMeter

        from .jsonl import jsonl_slices

        meter = None
        if model is not None and cfg.text_tokenizer_dir:
            from cheers.text_tokenizer import TextTokenizer

            meter = LengthMeter(model, TextTokenizer.from_dir(cfg.text_tokenizer_dir))
        try:
            return jsonl_slices(cfg.jsonl, num_streams=self.num_streams, min_side=cfg.min_image_side,
                                meter=meter, workers=max(1, cfg.num_workers), report=report)
        except InputError as e:
            raise DataError(str(e)) from None

    def __iter__(self) -> Iterator[RawSample]:
        while True:
            yield self.next_sample()

    def next_sample(self) -> RawSample:
        """The next usable sample of this rank."""
        s = self.stream_ids[self.rr]
        self.rr = (self.rr + 1) % len(self.stream_ids)
        for _ in range(_MAX_CONSECUTIVE_SKIPS):
            sample, rec, skip = self.readers[s].next()
            self.positions[s] = rec.state
            for reason, shard, key, detail in rec.skips:
                self._count(reason, shard, key, detail)
            if sample is not None:
                return sample
            self._count(skip[0], rec.shard, rec.key, skip[1])
        raise DataError(
            f"{_MAX_CONSECUTIVE_SKIPS} unusable samples in a row in data stream {s} "
            f"(skipped so far: {dict(self.skipped)}): the shards look broken"
        )

    def next_batch(self, n: int) -> list[RawSample]:
        """``n`` samples, round-robin over this rank's streams."""
        return [self.next_sample() for _ in range(n)]

    def _count(self, reason: str, shard: str, key: str, detail: str) -> None:
        self.skipped[reason] += 1
        n = self.skipped[reason]
        if n <= _LOG_FIRST or n % _LOG_EVERY == 0:
            where = f"{shard}:{key}" if key else shard
            log.warning("skipped %s (%s): %s [%d %s so far]", where, reason, detail, n, reason)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last returned sample: per stream, plus counters."""
        return {"num_streams": self.num_streams, "rr": self.rr,
                "streams": {str(s): copy.deepcopy(p) for s, p in self.positions.items()},
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (this rank's streams must all be in it)."""
        if state["num_streams"] != self.num_streams:
            raise DataError(
                f"the data position was saved with {state['num_streams']} data streams, this "
                f"run has {self.num_streams}: set data.num_streams={state['num_streams']}"
            )
        for s in self.stream_ids:
            if str(s) not in state["streams"]:
                raise DataError(f"the data position has no entry for data stream {s}")
            self.readers[s].reset()
            self.mixed[s].load_state_dict(state["streams"][str(s)])
            self.positions[s] = self.mixed[s].state_dict()
        self.rr = state["rr"] % len(self.stream_ids)
        self.skipped = collections.Counter(state.get("skipped", {}))

    def close(self) -> None:
        for r in self.readers.values():
            r.reset()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for m in self.mixed.values():
            m.close()
