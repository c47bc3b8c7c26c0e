"""The ``manifest`` source: a CSV or Parquet table of image paths plus metadata columns."""

from __future__ import annotations

import csv
import datetime as dt
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import Any

from streamssl.data.sources.base import DEFAULT_SPLIT, INT32_MAX, IngestError, Record, Source

MANIFEST_COLUMNS = ("path", "image_id", "label", "class_name", "domain", "timestamp", "split")


def _parse_timestamp(v: Any, where: str) -> int | None:
    """To microseconds since the epoch (UTC).

    Numbers are Unix seconds; strings are numbers or ISO 8601 (naive times are taken as UTC);
    datetimes from Parquet timestamp columns are used as they are.
    """
    if v is None:
        return None
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.timezone.utc)
        delta = v - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(v, dt.date):
        return _parse_timestamp(dt.datetime(v.year, v.month, v.day), where)
    if isinstance(v, bool):
        raise IngestError(f"{where}: timestamp {v!r} is not a time")
    if isinstance(v, (int, float)):
        return int(round(v * 1_000_000))
    s = str(v).strip()
    if not s:
        return None
    try:
        return int(round(float(s) * 1_000_000))
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s)
    except ValueError:
        raise IngestError(
            f"{where}: timestamp {s!r} is neither Unix seconds nor an ISO 8601 date/time"
        ) from None
    return _parse_timestamp(parsed, where)


def _label_value(v: Any) -> int | str | None:
    """Classify a raw label cell as an int, a text (class name), or empty."""
    if v is None:
        return None
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v != v:  # NaN: pandas' empty cell
            return None
        return int(v) if v.is_integer() else repr(v)
    s = str(v).strip()
    if not s:
        return None
    if re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    return s


def _clean_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, float) and v != v:
        return None
    s = str(v).strip()
    return s or None


class ManifestSource(Source):
    """A CSV or Parquet table of images: ``path`` plus optional metadata columns.

    Columns: ``path`` (required; relative to the manifest's folder, or absolute), ``image_id``
    (default: ``path`` as written), ``label`` (integers), ``class_name``, ``domain``,
    ``timestamp`` (Unix seconds, ISO 8601, or a Parquet timestamp; naive = UTC), ``split``
    (default ``train``). Other columns are ignored. A ``label`` column of class *names* (no
    ``class_name`` column) is accepted and treated as ``class_name``.

    The constructor makes one streaming pass over the label columns to check their types and
    fix the label <-> name mapping; the second pass (``__iter__``) yields the rows.
    """

    name = "manifest"

    @classmethod
    def from_src(cls, src: str | None) -> "ManifestSource":
        if not src:
            raise IngestError("manifest source needs --src: a CSV or Parquet file with a 'path' column")
        return cls(src)

    def __init__(self, path: str | os.PathLike[str], *, batch_rows: int = 8192) -> None:
        path = os.path.abspath(os.fspath(path))
        if not os.path.exists(path):
            raise IngestError(f"manifest source: {path} does not exist")
        if not os.path.isfile(path):
            raise IngestError(f"manifest source: {path} is not a file (expected a .csv or .parquet manifest)")
        self.path = path
        self.base = os.path.dirname(path)
        self.batch_rows = batch_rows
        self.format = "parquet" if self._is_parquet(path) else "csv"
        self.columns = self._header()
        if "path" not in self.columns:
            raise IngestError(
                f"manifest {path}: required column 'path' is missing (columns found: {', '.join(self.columns) or 'none'})"
            )
        self._plan_labels()

    # -- reading

    @staticmethod
    def _is_parquet(path: str) -> bool:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"

    def _header(self) -> list[str]:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            try:
                return list(pq.ParquetFile(self.path).schema_arrow.names)
            except Exception as e:  # noqa: BLE001
                raise IngestError(f"manifest {self.path}: cannot read Parquet: {e}") from None
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            try:
                row = next(csv.reader(f), None)
            except (csv.Error, UnicodeDecodeError) as e:
                raise IngestError(f"manifest {self.path}: cannot read CSV header: {e}") from None
        if not row:
            raise IngestError(f"manifest {self.path}: empty file (expected a CSV header with a 'path' column)")
        return [c.strip() for c in row]

    def _batches(self, columns: Sequence[str]) -> Iterator[dict[str, list[Any]]]:
        """Stream the given (present) columns as dicts of python lists, one batch at a time."""
        cols = [c for c in columns if c in self.columns]
        if self.format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self.path)
            for batch in pf.iter_batches(batch_size=self.batch_rows, columns=cols):
                yield {c: batch.column(c).to_pylist() for c in cols}
            return
        import pyarrow as pa
        import pyarrow.csv as pacsv

        # Every column is read as text and converted here, so a column whose type would be
        # inferred differently in two blocks cannot break the stream, and so the label check
        # below sees the raw values.
        names = list(self.columns)
        try:
            reader = pacsv.open_csv(
                self.path,
                read_options=pacsv.ReadOptions(block_size=1 << 20, column_names=names, skip_rows=1),
                convert_options=pacsv.ConvertOptions(
                    include_columns=cols,
                    column_types={c: pa.string() for c in cols},
                    strings_can_be_null=True,
                ),
            )
            for batch in reader:
                yield {c: batch.column(c).to_pylist() for c in cols}
        except pa.ArrowInvalid as e:
            raise IngestError(f"manifest {self.path}: cannot parse CSV: {e}") from None

    # -- labels

    def _plan_labels(self) -> None:
        """First pass: check the label column's type; fix label ints and the classes list."""
        has_name = "class_name" in self.columns
        ints: dict[int, str | None] = {}  # label -> class name (None until a row names it)
        label_texts: set[str] = set()  # text found in the 'label' column
        names_without_label: set[str] = set()  # class_name of rows whose label is empty
        example_int: int | None = None
        example_text: str | None = None
        rows = 0
        for b in self._batches(["path", "label", "class_name"]):
            n = len(b["path"])
            labels = b.get("label", [None] * n)
            names = b.get("class_name", [None] * n)
            for i, (lv, nv) in enumerate(zip(labels, names)):
                lab, name = _label_value(lv), _clean_str(nv)
                if isinstance(lab, int):
                    if example_int is None:
                        example_int = lab
                    if lab < 0 or lab > INT32_MAX:
                        raise IngestError(
                            f"manifest {self.path}: column 'label' has value {lab} ({self._row(rows + i)}); "
                            f"labels must be 0..{INT32_MAX}"
                        )
                    prev = ints.get(lab)
                    if name is not None and prev is not None and prev != name:
                        raise IngestError(
                            f"manifest {self.path}: label {lab} has two names in column 'class_name': "
                            f"{prev!r} and {name!r} ({self._row(rows + i)})"
                        )
                    if prev is None:
                        ints[lab] = name
                elif isinstance(lab, str):
                    if example_text is None:
                        example_text = lab
                    label_texts.add(lab)
                elif name is not None:
                    names_without_label.add(name)
            rows += n
        self.num_rows = rows
        if rows == 0:
            raise IngestError(f"manifest {self.path}: no rows")
        if ints and label_texts:
            raise IngestError(
                f"manifest {self.path}: column 'label' has mixed types: integers (e.g. {example_int}) and "
                f"text (e.g. {example_text!r}); put integer labels in 'label' and names in 'class_name'"
            )
        if label_texts and has_name:
            raise IngestError(
                f"manifest {self.path}: column 'label' holds text (e.g. {example_text!r}) while a 'class_name' "
                "column is also given; 'label' must hold integers"
            )
        if ints and names_without_label:
            raise IngestError(
                f"manifest {self.path}: column 'label' is empty in rows that have a 'class_name' "
                f"(e.g. {sorted(names_without_label)[0]!r}); label every named row, or drop the 'label' "
                "column to number classes by sorted name"
            )
        self._label_is_name = bool(label_texts)
        if ints:
            self._mode = "int"
            # Index = label. Labels that no row names get their number as their name.
            self._classes = [ints.get(i) or str(i) for i in range(max(ints) + 1)]
            self._label: dict[str, int] = {}
        else:
            self._mode = "name"
            self._classes = sorted(label_texts | names_without_label)
            self._label = {c: i for i, c in enumerate(self._classes)}

    def _row(self, i: int) -> str:
        """Human row number: CSV line (header = line 1) or 0-based Parquet row."""
        return f"line {i + 2}" if self.format == "csv" else f"row {i}"

    def classes(self) -> list[str]:
        return list(self._classes)

    def size_hint(self) -> dict[str, int] | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "src": self.path, "format": self.format}

    def __iter__(self) -> Iterator[Record]:
        rows = 0
        for b in self._batches(MANIFEST_COLUMNS):
            n = len(b["path"])
            col = lambda c: b.get(c, [None] * n)  # noqa: E731
            for i, (p, iid, lv, nv, dom, ts, sp) in enumerate(
                zip(b["path"], col("image_id"), col("label"), col("class_name"), col("domain"), col("timestamp"), col("split"))
            ):
                where = f"manifest {self.path} {self._row(rows + i)}"
                raw_path = _clean_str(p)
                lab = _label_value(lv)
                name = _clean_str(nv)
                if self._mode == "int":
                    label = lab if isinstance(lab, int) else None
                    if label is not None:
                        name = self._classes[label]
                else:
                    if self._label_is_name:
                        name = lab if isinstance(lab, str) else None
                    label = self._label[name] if name is not None else None
                full = None
                if raw_path is not None:
                    full = raw_path if os.path.isabs(raw_path) else os.path.normpath(os.path.join(self.base, raw_path))
                image_id = _clean_str(iid) or (
                    posixpath.normpath(raw_path.replace(os.sep, "/")) if raw_path else f"{self._row(rows + i)}"
                )
                yield Record(
                    image_id=image_id,
                    split=_clean_str(sp) or DEFAULT_SPLIT,
                    source=self.name,
                    label=label,
                    class_name=name,
                    domain=_clean_str(dom),
                    timestamp=_parse_timestamp(ts, where),
                    path=full,
                    origin=full or where,
                    error=None if full else "column 'path' is empty",
                )
            rows += n
