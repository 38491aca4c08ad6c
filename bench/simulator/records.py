"""Per-request records of a simulation: columnar, 8 bytes a field, a million rows cheap.

One row per request, written when it ends (completed, rejected or failed). Times are
virtual seconds; latencies are NaN where they do not apply (a rejected request has no
TTFT). `write` sorts rows by request number and writes CSV or JSON lines.
"""

from __future__ import annotations

import csv
import json
import math
from array import array
from pathlib import Path

import numpy as np

STATUSES = ("ok", "rejected", "failed")

# column -> array typecode ("d" float64, "q" int64)
COLUMNS = {
    "number": "q", "arrival_s": "d", "prompt_tokens": "q", "output_tokens": "q",
    "cached_tokens": "q", "prefix_group": "q", "slo_class": "q", "status": "q",
    "queue_s": "d", "ttft_s": "d", "tpot_s": "d", "e2e_s": "d", "replica": "q",
    "resumes": "q", "migrations": "q", "stall_s": "d",
}
_LABELLED = ("slo_class", "status", "replica")  # stored as indices into a label table


class RecordBook:
    def __init__(self) -> None:
        self._cols = {name: array(code) for name, code in COLUMNS.items()}
        self._labels: dict[str, list[str]] = {name: [] for name in _LABELLED}
        self._index: dict[str, dict[str, int]] = {name: {} for name in _LABELLED}
        for status in STATUSES:
            self._label("status", status)

    def __len__(self) -> int:
        return len(self._cols["number"])

    def add(self, **row: float | int | str) -> None:
        """Append one request; every column must be given (labels as strings)."""
        if row.keys() != COLUMNS.keys():
            raise ValueError(f"record columns differ: missing {sorted(COLUMNS.keys() - row.keys())}, "
                             f"unknown {sorted(row.keys() - COLUMNS.keys())}")
        for name, value in row.items():
            self._cols[name].append(self._label(name, value) if name in _LABELLED else value)

    def column(self, name: str) -> np.ndarray:
        """A column as a numpy array (a copy), rows in the order they ended."""
        return np.frombuffer(self._cols[name], dtype=np.float64 if COLUMNS[name] == "d" else np.int64).copy()

    def labels(self, name: str) -> list[str]:
        """The strings a labelled column's indices stand for."""
        return list(self._labels[name])

    def labelled(self, name: str) -> np.ndarray:
        """A labelled column as an array of strings."""
        return np.array(self._labels[name], dtype=object)[self.column(name)] if len(self) else np.array([])

    def write(self, path: Path, fmt: str) -> None:
        """Rows sorted by request number, as `csv` or `jsonl`."""
        order = np.argsort(self.column("number"), kind="stable")
        data = {name: (self.labelled(name) if name in _LABELLED else self.column(name))[order]
                for name in COLUMNS}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            if fmt == "csv":
                writer = csv.writer(f)
                writer.writerow(COLUMNS)
                for row in zip(*(_cells(data[name], COLUMNS[name]) for name in COLUMNS)):
                    writer.writerow(row)
            elif fmt == "jsonl":
                for row in zip(*(data[name].tolist() for name in COLUMNS)):
                    f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                        for k, v in zip(COLUMNS, row)}) + "\n")
            else:
                raise ValueError(f"unknown records format {fmt!r} (csv, jsonl)")

    def _label(self, name: str, value: str) -> int:
        index = self._index[name].get(value)
        if index is None:
            index = self._index[name][value] = len(self._labels[name])
            self._labels[name].append(value)
        return index


def _cells(values: np.ndarray, code: str) -> list:
    if code != "d":
        return values.tolist()
    return ["" if math.isnan(v) else f"{v:.6f}" for v in values.tolist()]
