"""Plain-text documents from local files, for pretraining.

* ``.txt``: with ``txt_documents="paragraph"`` (default) documents are separated by one or more blank lines and
  stripped of surrounding whitespace; with ``"file"`` the whole file, unchanged, is one document.
* ``.jsonl``: one JSON object per line; the document is its ``text_field``.
* ``.parquet``: the ``text_field`` column (needs ``pyarrow``).
* a directory written by ``datasets.Dataset.save_to_disk``: its ``text_field`` column (needs ``datasets``).

A malformed record (invalid JSON, not an object, missing field, not a string) is a DataError naming the file, the
line (1-based, JSONL) or row (0-based, Parquet and datasets) and the field; ``Malformed(skip=True)`` counts it
instead. File-level problems (unreadable file, missing column) always raise.
"""
from __future__ import annotations

import glob
import importlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from collie.errors import DataError

TXT_DOCUMENTS = ("paragraph", "file")
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SUPPORTED = ".txt, .jsonl, .parquet, or a directory written by datasets' save_to_disk"
BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
BATCH_ROWS = 4096


class Malformed:
    """Malformed records: raised, or (``skip=True``) counted with the first one remembered for the report."""

    def __init__(self, skip: bool = False):
        self.skip, self.count, self.first = skip, 0, None

    def report(self, error: DataError) -> None:
        if not self.skip:
            raise error
        self.count += 1
        self.first = self.first or str(error)


def expand_sources(files) -> list[Path]:
    """``files`` (a path, glob pattern or list of them) as existing paths, globs expanded in sorted order."""
    entries = [files] if isinstance(files, (str, Path)) else list(files)
    paths = []
    for entry in map(str, entries):
        if not glob.has_magic(entry):
            if not Path(entry).exists():
                raise DataError(f"data file '{entry}' does not exist")
            paths.append(Path(entry))
        elif matches := sorted(glob.glob(entry)):
            paths += map(Path, matches)
        else:
            raise DataError(f"data files '{entry}': the pattern matches no file")
    if not paths:
        raise DataError("no data files given: name at least one file (" + SUPPORTED + ")")
    return paths


def source_fingerprint(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(absolute path, size, mtime_ns) of every file read; a saved dataset contributes all its files."""
    files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def read_documents(path: Path, text_field: str = "text", txt_documents: str = "paragraph",
                   malformed: Malformed | None = None) -> Iterator[str]:
    """The documents of one source, in order."""
    malformed = malformed or Malformed()
    if txt_documents not in TXT_DOCUMENTS:
        raise DataError(f"txt_documents={txt_documents!r} is invalid; choose one of {', '.join(TXT_DOCUMENTS)}")
    if path.is_dir():
        if not any((path / marker).exists() for marker in DATASET_MARKERS):
            raise DataError(f"'{path}' is a directory but not a dataset saved by datasets' save_to_disk; name its "
                            f"files instead (a glob such as '{path}/*.jsonl' works)")
        return _read_saved_dataset(path, text_field, malformed)
    if path.suffix == ".txt":
        return _read_txt(path, txt_documents, malformed)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field, malformed)
    if path.suffix == ".parquet":
        return _read_parquet(path, text_field, malformed)
    raise DataError(f"data file '{path}' has an unsupported type; pretraining reads {SUPPORTED}")


def _read_txt(path: Path, txt_documents: str, malformed: Malformed) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        malformed.report(DataError(f"{path}: not valid UTF-8 at byte {e.start}"))
        return
    if txt_documents == "file":
        yield text
    else:
        yield from (p for p in map(str.strip, BLANK_LINES.split(text)) if p)


def _read_jsonl(path: Path, field: str, malformed: Malformed) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
            except UnicodeDecodeError as e:
                malformed.report(DataError(f"{where}: not valid UTF-8 at byte {e.start} of the line"))
                continue
            except json.JSONDecodeError as e:
                malformed.report(DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})"))
                continue
            except RecursionError:
                malformed.report(DataError(f"{where}: JSON nested too deeply to be a record"))
                continue
            if not isinstance(record, dict):
                malformed.report(DataError(f"{where}: expected a JSON object with a '{field}' field, "
                                           f"got {_json_type(record)}"))
            elif field not in record:
                malformed.report(DataError(f"{where}: missing text field '{field}' (fields: "
                                           f"{', '.join(record) or 'none'}; set data.text_field to the text's field)"))
            else:
                yield from _checked(record[field], where, field, malformed)


def _read_parquet(path: Path, field: str, malformed: Malformed) -> Iterator[str]:
    parquet = _optional("pyarrow.parquet", "pyarrow", path)
    try:
        table = parquet.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, … for files it cannot read
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    _require_column(path, field, table.schema_arrow.names)
    batches = (batch.column(0).to_pylist() for batch in table.iter_batches(BATCH_ROWS, columns=[field]))
    yield from _checked_rows(batches, path, field, malformed)


def _read_saved_dataset(path: Path, field: str, malformed: Malformed) -> Iterator[str]:
    datasets = _optional("datasets", "datasets", path)
    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable saved dataset ({e})") from e
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path} holds a DatasetDict with splits {', '.join(dataset)}; name one split's directory, "
                        f"e.g. '{path / next(iter(dataset))}'")
    _require_column(path, field, dataset.column_names)
    batches = (batch[field] for batch in dataset.select_columns([field]).iter(batch_size=BATCH_ROWS))
    yield from _checked_rows(batches, path, field, malformed)


def _checked_rows(batches: Iterable[list], path: Path, field: str, malformed: Malformed) -> Iterator[str]:
    row = 0
    for values in batches:
        for value in values:
            yield from _checked(value, f"{path}, row {row}", field, malformed)
            row += 1


def _checked(value, where: str, field: str, malformed: Malformed) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    else:
        malformed.report(DataError(f"{where}: field '{field}' is {_json_type(value)}, expected a string"))


def _require_column(path: Path, field: str, columns: list[str]) -> None:
    if field not in columns:
        raise DataError(f"{path}: no column '{field}' (columns: {', '.join(columns)}); set data.text_field to the "
                        f"column that holds the text")


def _optional(module: str, package: str, path: Path):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading '{path}' needs the optional package '{package}': pip install {package} "
                        f"(or pip install 'collie[data]')") from None


def _json_type(value) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
             dict: "an object", str: "a string"}
    return names.get(type(value), type(value).__name__)
