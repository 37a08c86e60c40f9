"""Hugging Face style folders: JSON, safetensors files (single or sharded), strict loading.

Every failure raises :class:`cheers.errors.CheckpointError` naming the file, key or shape at
fault. Writes are atomic (a temporary file in the same folder, then ``os.replace``), so a crash
never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cheers.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json
_MAX_LISTED = 20  # names listed per category in an error message


# --------------------------------------------------------------------------- JSON


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object; a missing file, bad syntax or a non-object top level names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    return data


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(data: Mapping[str, Any], path: str | Path) -> None:
    """Write pretty JSON atomically."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------- safetensors


def _check_safetensors_header(path: Path) -> None:
    """Validate the header and the data size so a damaged file gets a precise message.

    Format: 8-byte little-endian header length N, N bytes of JSON (name -> dtype, shape,
    data_offsets), then the tensor data, which must end exactly at the file's end.
    """
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file: header claims {n} bytes, "
                f"file has {size - 8} after the length field"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry {name!r}") from e
    have = size - 8 - n
    if have < end:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensor data needs {end} bytes, file holds {have}"
        )


def read_safetensors(path: str | Path, *, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load every tensor of one ``.safetensors`` file.

    A missing, truncated or corrupt file raises ``CheckpointError`` naming it and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    _check_safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e


def read_state_dict(
    folder: str | Path, *, weights_name: str = WEIGHTS_NAME, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """All tensors of a checkpoint: ``folder/model.safetensors`` or a sharded index.

    ``folder`` may also be a ``.safetensors`` file. With an index
    (``model.safetensors.index.json``), every shard it names must exist and hold the keys the
    index maps to it.
    """
    folder = Path(folder)
    if folder.is_file():
        return read_safetensors(folder, device=device)
    single = folder / weights_name
    index = folder / (weights_name + INDEX_SUFFIX)
    if single.is_file():
        return read_safetensors(single, device=device)
    if not index.is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(
            f"{folder}: no {weights_name} or {index.name} found"
            + (f" (folder holds: {', '.join(found[:10])})" if found else " (no such folder or empty)")
        )
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' object")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    out: dict[str, Tensor] = {}
    for shard, keys in by_shard.items():
        shard_path = folder / shard
        if not shard_path.is_file():
            raise CheckpointError(
                f"{index}: shard file {shard_path} is missing (it should hold {keys[0]!r} "
                f"and {len(keys) - 1} more tensors)"
            )
        tensors = read_safetensors(shard_path, device=device)
        absent = [k for k in keys if k not in tensors]
        if absent:
            raise CheckpointError(
                f"{shard_path}: tensor {absent[0]!r} listed in {index.name} is not in the shard "
                f"({len(absent)} missing)"
            )
        out.update(tensors)
    return out


def _plain_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors with no two sharing memory (safetensors refuses shared ones)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in state_dict.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"cannot write {name!r}: not a tensor ({type(t).__name__})")
        if t.is_meta:
            raise CheckpointError(f"cannot write {name!r}: it is on the meta device (no data)")
        t = t.detach().to("cpu").contiguous()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and storage in seen:  # tied weights, views of one buffer: store a copy
            t = t.clone()
        seen.add(storage)
        out[name] = t
    return out


def write_safetensors(
    state_dict: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors to one ``.safetensors`` file atomically.

    Tied or otherwise shared tensors are written as separate copies. ``metadata`` (str -> str)
    is stored in the header beside ``{"format": "pt"}``, which ``transformers`` expects.
    """
    tensors = _plain_tensors(state_dict)
    meta = {"format": "pt", **dict(metadata or {})}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def write_state_dict(
    state_dict: Mapping[str, Tensor],
    folder: str | Path,
    *,
    weights_name: str = WEIGHTS_NAME,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write a checkpoint folder in the HF layout: one file, or shards plus an index.

    Shards are named ``model-00001-of-00003.safetensors``; a tensor larger than
    ``max_shard_bytes`` gets a shard of its own. Returns the files written.
    """
    folder = Path(folder)
    tensors = _plain_tensors(state_dict)
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        write_safetensors(tensors, folder / weights_name, metadata)
        return [folder / weights_name]

    shards: list[list[str]] = [[]]
    used = 0
    for key in tensors:
        if shards[-1] and used + sizes[key] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    stem, ext = weights_name.rsplit(".", 1)
    written, weight_map = [], {}
    for i, keys in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        write_safetensors({k: tensors[k] for k in keys}, folder / name, metadata)
        weight_map.update(dict.fromkeys(keys, name))
        written.append(folder / name)
    index = folder / (weights_name + INDEX_SUFFIX)
    write_json({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, index)
    return [*written, index]


# --------------------------------------------------------------------------- checked loading


@dataclass
class LoadReport:
    """What :func:`load_checked` found. ``mismatched`` holds ``(name, expected, found)`` shapes."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def check(self, what: str = "module") -> None:
        """Raise ``CheckpointError`` with :meth:`describe` unless every tensor fits."""
        if not self.ok:
            raise CheckpointError(self.describe(what))

    def describe(self, what: str = "module") -> str:
        """A multi-line message listing every problem by name."""

        def listing(items: list[str]) -> str:
            more = len(items) - _MAX_LISTED
            return ", ".join(items[:_MAX_LISTED]) + (f", ... and {more} more" if more > 0 else "")

        lines = [
            f"{self.source}: checkpoint does not fit the {what}: {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mis-shaped tensors"
        ]
        if self.missing:
            lines.append(f"  missing: {listing(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected: {listing(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{n} (expected {list(e)}, found {list(f)})" for n, e, f in self.mismatched]
            lines.append(f"  mis-shaped: {listing(shapes)}")
        return "\n".join(lines)


def _alias_groups(module: nn.Module) -> dict[str, list[str]]:
    """For each state-dict name, all names of the same tensor (tied weights share one)."""
    by_id: dict[int, list[str]] = {}
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, t in named:
        by_id.setdefault(id(t), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def fit_report(
    module: nn.Module, state_dict: Mapping[str, Any], *, source: str,
    display: Callable[[str], str] | None = None,
) -> LoadReport:
    """Compare names and shapes of ``state_dict`` with ``module.state_dict()``, copying nothing
    (so ``module`` may live on the ``meta`` device); ``loaded`` lists the tensors that fit.

    A tied weight counts as present when any of its names is in ``state_dict``. ``display``
    maps our names to the checkpoint's own in the problems listed.
    """

    def shown(name: str) -> str:
        theirs = display(name) if display else name
        return name if theirs == name else f"{theirs} (ours: {name})"

    expected = module.state_dict()
    aliases = _alias_groups(module)
    report = LoadReport(source=source)
    for name in expected:
        if name in state_dict:
            continue
        if not any(a in state_dict for a in aliases.get(name, [])):
            report.missing.append(shown(name))
    for name, value in state_dict.items():
        if name not in expected:
            report.unexpected.append(shown(name))
            continue
        want = expected[name]
        if isinstance(want, Tensor) and isinstance(value, Tensor) and want.shape != value.shape:
            report.mismatched.append((shown(name), tuple(want.shape), tuple(value.shape)))
            continue
        report.loaded.append(name)
    return report


def load_checked(
    module: nn.Module, state_dict: Mapping[str, Any], *, source: str, strict: bool = True,
    display: Callable[[str], str] | None = None,
) -> LoadReport:
    """Compare names and shapes with ``module.state_dict()`` (:func:`fit_report`), then copy the
    values in: the one loading path of every checkpoint layout (``cheers.adapters``).

    Nothing is copied until the comparison is done. With ``strict`` any missing, unexpected or
    mis-shaped tensor raises ``CheckpointError`` listing them all, with ``source`` (the file or
    folder) in the message. With ``strict=False`` the tensors that fit are loaded and the report
    is returned. A tied weight counts as present when any of its names is in ``state_dict``.
    Values are cast to the module's own dtype and device.
    """
    report = fit_report(module, state_dict, source=source, display=display)
    fitting = {name: state_dict[name] for name in report.loaded}
    if strict:
        report.check(type(module).__name__)
    # load_state_dict keeps custom _load_from_state_dict hooks (e.g. quantised layers) working
    # and copies in place, so dtype, device and weight ties of the module are kept.
    result = module.load_state_dict(fitting, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; never ignore it
        raise CheckpointError(f"{source}: unexpected keys after checking: {result.unexpected_keys}")
    report.loaded = sorted(fitting)
    return report
