"""Reading CSV data and generating seeded synthetic sets.

A CSV may start with a header row (detected: a column with text in the first
row and a number in the second). Features must be numbers; a label
column (k-NN training and optionally test files) may hold any text. Every
problem is a :class:`MiningError` naming the file, row and column.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dms.mining.errors import MiningError


@dataclass
class Table:
    features: np.ndarray  # rows x attributes, float64
    labels: list[str] | None
    columns: list[str]  # feature column names
    label_name: str | None


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _looks_like_header(rows: list[list[str]]) -> bool:
    """Text above a number in some column (a label column is text in every row)."""
    first = rows[0]
    if len(rows) == 1:
        return not any(_is_number(c) for c in first)
    second = rows[1]
    return any(not _is_number(a) and _is_number(b) for a, b in zip(first, second, strict=False))


def _read_rows(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    if not path.exists():
        raise MiningError(f"{path}: no such file")
    if path.is_dir():
        raise MiningError(f"{path}: is a folder, not a CSV file")
    try:
        with path.open(newline="") as fh:
            rows = [
                [c.strip() for c in row] for row in csv.reader(fh) if any(c.strip() for c in row)
            ]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MiningError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows:
        raise MiningError(f"{path}: the file is empty")
    header = None
    if _looks_like_header(rows):
        header, rows = rows[0], rows[1:]
    if not rows:
        raise MiningError(f"{path}: the file has a header but no data rows")
    width = len(header) if header else len(rows[0])
    for number, row in enumerate(rows, start=2 if header else 1):
        if len(row) != width:
            raise MiningError(f"{path}: row {number} has {len(row)} cells, expected {width}")
    return header, rows


def _label_index(header: list[str] | None, width: int, label_column: str | None, path: Path) -> int:
    if label_column is None:
        return width - 1
    if header and label_column in header:
        return header.index(label_column)
    if label_column.lstrip("-").isdigit():
        index = int(label_column)
        if -width <= index < width:
            return index % width
    raise MiningError(f"{path}: no label column {label_column!r}")


def read_table(path: str | Path, *, label: bool = False, label_column: str | None = None) -> Table:
    """Numeric features, plus (with ``label=True``) one text label column."""
    path = Path(path)
    header, rows = _read_rows(path)
    width = len(rows[0])
    names = header or [f"x{i}" for i in range(width)]
    label_at = _label_index(header, width, label_column, path) if label else None
    if label and width < 2:
        raise MiningError(f"{path}: needs at least one feature column besides the label")
    feature_at = [i for i in range(width) if i != label_at]
    values = np.empty((len(rows), len(feature_at)), dtype=np.float64)
    first = 2 if header else 1
    for r, row in enumerate(rows):
        for c, i in enumerate(feature_at):
            try:
                values[r, c] = float(row[i])
            except ValueError:
                raise MiningError(
                    f"{path}: row {r + first}, column '{names[i]}': {row[i]!r} is not a number"
                ) from None
    if not np.isfinite(values).all():
        raise MiningError(f"{path}: features must be finite numbers (found nan or inf)")
    return Table(
        features=values,
        labels=[row[label_at] for row in rows] if label_at is not None else None,
        columns=[names[i] for i in feature_at],
        label_name=names[label_at] if label_at is not None else None,
    )


def read_test_table(path: str | Path, train: Table) -> Table:
    """Test rows: the training features, with or without the label column."""
    path = Path(path)
    header, rows = _read_rows(path)
    width, features = len(rows[0]), train.features.shape[1]
    if width == features:
        return read_table(path)
    if width == features + 1:
        label_column = train.label_name if header and train.label_name in header else None
        return read_table(path, label=True, label_column=label_column)
    raise MiningError(
        f"{path}: test rows have {width} columns; training has {features} features (plus the label)"
    )


def write_labels(path: Path, labels: list[object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label"])
        writer.writerows([label] for label in labels)


# ---- synthetic data -------------------------------------------------------------------


def blobs(
    n: int,
    a: int,
    k: int,
    *,
    seed: int = 0,
    std: float = 1.0,
    spread: float = 10.0,
    offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """k Gaussian clusters (sklearn ``make_blobs`` style); ``offset`` shifts every feature."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-spread, spread, size=(k, a))
    truth = rng.integers(0, k, size=n)
    return centers[truth] + rng.normal(0.0, std, size=(n, a)) + offset, truth


def classification(
    n: int, a: int, classes: int, *, seed: int = 0, std: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled Gaussian classes with overlap, for k-NN."""
    return blobs(n, a, classes, seed=seed, std=std)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dms.mining.data", description=__doc__)
    parser.add_argument("kind", choices=["blobs", "classification"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--a", type=int, default=8)
    parser.add_argument("--k", "--classes", dest="k", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    make = blobs if args.kind == "blobs" else classification
    x, y = make(args.n, args.a, args.k, seed=args.seed)
    with args.out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        header = [f"x{i}" for i in range(args.a)]
        writer.writerow(header + (["label"] if args.kind == "classification" else []))
        for row, label in zip(x, y, strict=True):
            cells = [f"{v:.6f}" for v in row]
            writer.writerow(cells + ([f"class{label}"] if args.kind == "classification" else []))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
