"""Reading rows: local .jsonl / .json / .csv / .parquet files (each optionally gzipped) and hub datasets.

Every row comes with its 1-based line (JSONL, CSV) or row (JSON, parquet) number, so a bad
row can be named; a file that does not parse is one DataFileError naming the file and line.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from typing import Any, Iterator

from dpo_exp.errors import DataFileError


def _file_format(path: str) -> tuple[str, bool]:
    name = path.lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[:-3]
    for fmt in ("jsonl", "json", "csv", "parquet"):
        if name.endswith("." + fmt):
            return fmt, compressed
    raise DataFileError(f"{path}: unsupported file type; expected .jsonl, .json, .csv or .parquet, "
                        "each optionally .gz")


def line_numbered(path: str) -> bool:
    return _file_format(str(path))[0] in ("jsonl", "csv")


def _open_binary(path: str, compressed: bool):
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__)


def read_rows(path) -> Iterator[tuple[int, dict]]:
    """Rows of a local file: .jsonl/.json/.parquet/.csv, each optionally .gz; yields (number, row).

    The file type and existence are checked at once; parse errors surface while iterating, as
    one DataFileError naming the file and line (or row).
    """
    path = str(path)
    fmt, compressed = _file_format(path)
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: no such file (data.path / data.eval_path are read from where the command "
                            f"runs: {os.getcwd()})")
    reader = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}[fmt]
    return _guarded(path, reader(path, compressed))


def check_readable(path) -> None:
    """The file exists, has a known type and its first row parses; the rest is read (and checked) when used."""
    rows = read_rows(path)
    try:
        next(rows, None)
    finally:
        rows.close()


def _guarded(path: str, rows: Iterator[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    # A truncated or mislabelled .gz only fails once read; say which file rather than letting
    # gzip's internals surface.
    try:
        yield from rows
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataFileError(f"{path}: not a readable gzip file ({err})") from None
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path}: not UTF-8 text ({err.reason})") from None


def _jsonl_rows(path: str, compressed: bool) -> Iterator[tuple[int, dict]]:
    # Bytes, split on b"\n" only: JSON strings cannot hold a raw newline, so each line is one
    # record, and decoding per line lets a bad byte be reported with its line.
    with _open_binary(path, compressed) as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFileError(f"{path}: line {number}: not UTF-8 text ({err.reason})") from None
            if number == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}: line {number}: not valid JSON: {err.msg} "
                                    f"(column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}: line {number}: expected a JSON object, got {json_type(row)}")
            yield number, row


def _json_rows(path: str, compressed: bool) -> Iterator[tuple[int, dict]]:
    with _open_binary(path, compressed) as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path}: not UTF-8 text ({err.reason})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            # JSON Lines under a .json name, as datasets' Dataset.to_json writes by default.
            yield from _jsonl_rows(path, compressed)
            return
        raise DataFileError(f"{path}: line {err.lineno}: not valid JSON: {err.msg} "
                            f"(column {err.colno})") from None
    if isinstance(doc, dict):
        doc = doc["data"] if isinstance(doc.get("data"), list) else [doc]  # one-line JSON Lines
    if not isinstance(doc, list):
        raise DataFileError(f"{path}: expected a list of objects or {{\"data\": [...]}}, got {json_type(doc)}")
    for number, row in enumerate(doc, 1):
        if not isinstance(row, dict):
            raise DataFileError(f"{path}: row {number}: expected a JSON object, got {json_type(row)}")
        yield number, row


def _csv_rows(path: str, compressed: bool) -> Iterator[tuple[int, dict]]:
    # csv.reader rather than DictReader: quoted fields span lines (TL;DR posts do), and
    # reader.line_num is what gives the record's first line; DictReader hides blank lines and
    # pads or nests short and long records instead of reporting them.
    opener = gzip.open if compressed else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataFileError(f"{path}: line 1: not valid CSV: {err}") from None
        while True:
            start = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataFileError(f"{path}: line {start}: not valid CSV: {err}") from None
            if not record:  # a blank line
                continue
            if len(record) != len(header):
                raise DataFileError(f"{path}: line {start}: {len(record)} fields, but the header "
                                    f"has {len(header)}")
            yield start, dict(zip(header, record))


def _parquet_rows(path: str, compressed: bool) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading parquet files needs pyarrow: pip install pyarrow") from err
    if compressed:  # parquet needs random access; a gzipped one is read into memory first
        with gzip.open(path, "rb") as handle:
            source: Any = io.BytesIO(handle.read())
    else:
        source = path
    try:
        table = pq.ParquetFile(source)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataFileError(f"{path}: not a valid parquet file ({err})") from None
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def hub_rows(hub_name: str, split: str, config: str | None = None, **load_kwargs) -> Iterator[tuple[int, dict]]:
    """datasets.load_dataset(hub_name, config, split=split) for users with a network; rows from 1.

    load_kwargs go to load_dataset, e.g. data_dir="helpful-base" for one subset of Anthropic/hh-rlhf. A dataset
    that cannot be reached (no network, HF_HUB_OFFLINE, a name the hub does not have) is one DataFileError naming
    it and the split, and saying what to do instead.
    """
    import datasets
    from huggingface_hub.errors import HfHubHTTPError

    try:
        dataset = datasets.load_dataset(hub_name, config, split=split, **load_kwargs)
    except (ConnectionError, FileNotFoundError, HfHubHTTPError) as err:  # unreachable, offline, no such dataset
        raise DataFileError(unreachable_dataset(hub_name, config, split, err)) from err
    for number, row in enumerate(dataset, 1):
        yield number, dict(row)


def unreachable_dataset(hub_name: str, config: str | None, split: str, err: Exception) -> str:
    """What to do when a hub dataset cannot be read: give local files, or run where the hub is reachable."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    offline = " (HF_HUB_OFFLINE is set: only datasets in the local Hugging Face cache can be read)" if (
        os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")) else ""
    name = f"{hub_name}{'/' + config if config else ''}[{split}]"
    return (f"cannot read the hub dataset {name}: {reason}{offline}. Give the data as local files (data.path=FILE, "
            "and data.eval_path=FILE for the held-out split), or run where the Hugging Face Hub is reachable")


