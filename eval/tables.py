"""VLMEvalKit-format benchmark tables: TSV (or XLSX) rows, base64 images, prediction files.

A VLMEvalKit TSV has one question per row; the ``image`` cell holds a base64-encoded image
or, to save space, the ``index`` of another row whose image it shares (any cell of at most
64 characters is such a reference, as in VLMEvalKit's ``ImageBaseDataset``). Predictions
files are the benchmark's columns without ``image``, plus ``prediction``.

Errors name the file, the row (1-based data row and its ``index``) and the column.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import sys
from collections.abc import Iterable, Mapping, Sequence

from cheers.errors import InputError

IMAGE_REF_MAX = 64  # VLMEvalKit: an image cell this short is another row's index


def _cell(v) -> str:
    return "" if v is None else str(v)


def read_table(
    path: str, required: Sequence[str] = (), what: str = "benchmark table"
) -> list[dict]:
    """Rows of a ``.tsv`` (tab-separated, header first) or ``.xlsx`` file as dicts of strings.

    Raises InputError when the file cannot be read or lacks a ``required`` column.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    if path.lower().endswith(".xlsx"):
        rows, columns = _read_xlsx(path, what)
    else:
        csv.field_size_limit(sys.maxsize)  # base64 images exceed the default 128 KiB
        try:
            with open(path, newline="", encoding="utf-8") as fp:
                reader = csv.DictReader(fp, delimiter="\t")
                rows = [{k: _cell(v) for k, v in r.items() if k is not None} for r in reader]
                columns = list(reader.fieldnames or [])
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise InputError(f"cannot read {what} {path}: {e}") from e
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputError(f"{what} {path} lacks column(s) {missing}; it has {columns}")
    return rows


def _read_xlsx(path: str, what: str) -> tuple[list[dict], list[str]]:
    try:
        import openpyxl
    except ImportError as e:
        raise InputError(
            f"reading {path} needs the Python package openpyxl, which is not "
            "installed (pip install openpyxl); or save the file as TSV"
        ) from e
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        sheet = book.worksheets[0]
        values = list(sheet.iter_rows(values_only=True))
    except Exception as e:  # openpyxl raises many types on a bad file
        raise InputError(f"cannot read {what} {path}: {e}") from e
    if not values:
        return [], []
    header = [_cell(h) for h in values[0]]
    return [{h: _cell(v) for h, v in zip(header, row)} for row in values[1:]], header


def row_name(i: int, row: Mapping) -> str:
    """'row 3 (index 1000002)': how errors name a row (1-based, header not counted)."""
    return f"row {i + 1} (index {row.get('index', '?')})"


def resolve_images(rows: list[dict], path: str = "") -> list[dict]:
    """Replace every image cell that refers to another row's ``index`` by that row's image."""
    by_index = {str(r.get("index", "")): r.get("image", "") for r in rows}
    out = []
    for i, r in enumerate(rows):
        img = r.get("image", "")
        if img and len(img) <= IMAGE_REF_MAX:
            target = by_index.get(img.strip())
            if target is None or len(target) <= IMAGE_REF_MAX:
                raise InputError(
                    f"{path}: {row_name(i, r)}: image cell {img!r} is neither base64 "
                    "data nor the index of a row that has an image"
                )
            r = {**r, "image": target}
        out.append(r)
    return out


def decode_image(row: Mapping, where: str):
    """The row's base64 ``image`` as an RGB PIL image; ``where`` names the row in errors."""
    from PIL import Image, UnidentifiedImageError

    data = row.get("image", "")
    if not data:
        raise InputError(f"{where}: the image cell is empty")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{where}: the image cell is not valid base64 ({e})") from e
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{where}: the image cell does not decode to an image ({e})") from e
    return img.convert("RGB")


def write_tsv(
    rows: Iterable[Mapping],
    path: str,
    columns: Sequence[str] | None = None,
    drop: Sequence[str] = (),
) -> None:
    """Rows as a tab-separated file; columns in first-seen order unless given."""
    rows = list(rows)
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    columns = [c for c in columns if c not in drop]
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fp:
        w = csv.DictWriter(
            fp, fieldnames=list(columns), delimiter="\t", lineterminator="\n", extrasaction="ignore"
        )
        w.writeheader()
        for r in rows:
            w.writerow({c: _cell(r.get(c)) for c in columns})


__all__ = ["decode_image", "read_table", "resolve_images", "row_name", "write_tsv"]
