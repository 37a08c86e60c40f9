"""``data.jsonl``: the trainer reads JSONL files (``cheers.data_format.SCHEMA``) directly, no
packing step, for data small enough to check whole at start-up.

Each file is checked as ``cheers data check`` checks it (schema, every image decoded, ids, and
with the model config and ``data.text_tokenizer_dir`` token lengths); every problem is logged
with its line and that line is left out, the rest kept whole. The usable samples are split, in
line order, into slices that read like tar shards (``JsonlSlice``: ``TarShard``'s interface,
the same records ``cheers data pack`` would write), so the shard machinery of ``train/data.py``
(streams, shuffle windows, exact resume) serves them unchanged. Images are read from their files
when a sample is handed out.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from cheers.data_format import LengthMeter, Sample, Scan, scan_jsonl
from cheers.errors import InputError

log = logging.getLogger("cheers.train.data")

SLICE_SAMPLES = 1000  # samples per slice, unless more slices are needed for data.num_streams
_LOG_ISSUES = 20  # per file; the count of the rest is logged


@dataclass(frozen=True)
class _Member:
    """A slice member: the record's JSON bytes, or an image file read when asked for."""

    data: bytes | None = None
    path: Path | None = None


class JsonlSlice:
    """Samples ``first .. first + len - 1`` (in line order) of one checked JSONL file, with
    ``TarShard``'s interface: ``path``, ``samples`` as ``(key, {ext: member})``, ``read``."""

    def __init__(self, path: str, samples: list[Sample], source: str):
        self.path = path
        self.samples: list[tuple[str, dict[str, _Member]]] = []
        for s in samples:
            members = {"json": _Member(data=json.dumps(s.record(source)).encode("utf-8"))}
            members.update({n: _Member(path=p) for n, p in zip(s.member_names(), s.image_paths)})
            self.samples.append((s.key, members))

    def read(self, member: _Member) -> bytes:
        return member.data if member.data is not None else member.path.read_bytes()

    def close(self) -> None:
        """Nothing to close: image files are opened per read."""


def jsonl_slices(paths: list[str], *, num_streams: int, min_side: int, meter: LengthMeter | None,
                 workers: int, report: bool) -> dict[str, JsonlSlice]:
    """Check each file of ``data.jsonl`` and cut its usable samples into slices, by slice path
    (``FILE@k``). ``report``: log the problems (one rank does). Raises ``InputError`` for a
    missing file, or one with fewer usable samples than ``num_streams``."""
    slices: dict[str, JsonlSlice] = {}
    for path in paths:
        scan = scan_jsonl(path, min_side=min_side, meter=meter, workers=workers)
        if report:
            _log_scan(scan)
        n = len(scan.samples)
        if n < num_streams:
            raise InputError(f"data.jsonl {path}: {n} usable sample(s) of {scan.records} lines for "
                             f"{num_streams} data streams; every stream needs one ({scan.report(5)})")
        pieces = max(num_streams, math.ceil(n / SLICE_SAMPLES))
        bounds = [round(k * n / pieces) for k in range(pieces + 1)]
        for k in range(pieces):
            name = f"{path}@{k:04d}"
            slices[name] = JsonlSlice(name, scan.samples[bounds[k]:bounds[k + 1]], Path(path).name)
    return slices


def _log_scan(scan: Scan) -> None:
    problems = scan.problems
    log.info("data.jsonl %s: %d lines, %d usable, %d skipped (%s)", scan.source, scan.records,
             len(scan.samples), len(problems), ", ".join(f"{t} {c}" for t, c in scan.counts().items()))
    for issue in scan.issues[:_LOG_ISSUES]:
        log.warning("%s %s", "skipped" if issue.skipped else "kept", issue)
    if len(scan.issues) > _LOG_ISSUES:
        log.warning("... and %d more issues in %s (`cheers data check %s` lists them all)",
                    len(scan.issues) - _LOG_ISSUES, scan.source, scan.source)
