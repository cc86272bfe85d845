"""Read the cohort manifest: which slide belongs to which patient and timepoint."""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = ["Manifest", "ManifestRow", "read_manifest", "slide_id_from_path"]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("patient_id", "timepoint", "slide")
_SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".qptiff", ".tiff", ".tif", ".zarr")


@dataclass(frozen=True)
class ManifestRow:
    """One slide of the cohort.

    Attributes
    ----------
    slide_id : str
        Unique id (the ``slide_id`` column, else the file name without its suffix).
    patient_id, timepoint : str
    path : Path
        Absolute path of the slide.
    pixel_um : float or None
        Pixel size (µm) that overrides or fills the slide's metadata.
    extra : dict of str to str
        Any further columns, kept as sample annotations.
    line : int
        Line of the CSV file (header = 1), for messages.
    """

    slide_id: str
    patient_id: str
    timepoint: str
    path: Path
    pixel_um: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True)
class Manifest:
    path: Path
    rows: tuple[ManifestRow, ...]

    def to_frame(self) -> pd.DataFrame:
        """One row per slide, indexed by ``slide_id``; manifest columns as strings."""
        records = [
            {
                "slide_id": r.slide_id,
                "patient_id": r.patient_id,
                "timepoint": r.timepoint,
                "slide": str(r.path),
                **r.extra,
            }
            for r in self.rows
        ]
        return pd.DataFrame.from_records(records).set_index("slide_id", drop=False)


def slide_id_from_path(path: str | Path) -> str:
    """File name without its slide suffix: ``P01_pre.ome.tif`` -> ``P01_pre``."""
    name = Path(path).name
    lower = name.lower()
    for suffix in _SLIDE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_manifest(path: str | Path, *, timepoints: Sequence[str] = ("pre", "post")) -> Manifest:
    """Read and check a manifest CSV.

    Columns ``patient_id,timepoint,slide`` are required; ``slide_id`` and ``pixel_um``
    are understood; every other column is kept. Relative slide paths are relative to
    the manifest's folder. Slide files are not opened here: a missing slide fails on
    its own during the run, so that one bad slide never stops the batch. A patient
    without a slide at every timepoint is accepted with a logged warning.

    Parameters
    ----------
    path : str or Path
        The CSV file.
    timepoints : sequence of str
        Allowed values of ``timepoint``.

    Returns
    -------
    Manifest

    Raises
    ------
    FileNotFoundError
        If the manifest does not exist.
    ValueError
        Naming the file and the line: missing columns, empty values, an unknown
        timepoint, a bad ``pixel_um``, duplicate slide ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: manifest lacks column(s) {', '.join(missing)} "
                f"(required: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(header) or 'none'})"
            )
        reader.fieldnames = header
        rows = []
        seen: dict[str, int] = {}
        for line, record in enumerate(reader, start=2):
            record = {k: (v or "").strip() for k, v in record.items() if k is not None}
            if not any(record.values()):
                continue
            rows.append(_parse_row(path, line, record, timepoints))
            slide_id = rows[-1].slide_id
            if slide_id in seen:
                raise ValueError(
                    f"{path}: line {line}: duplicate slide id {slide_id!r} (first on line {seen[slide_id]})"
                )
            seen[slide_id] = line
    if not rows:
        raise ValueError(f"{path}: manifest has no slides")
    _warn_unpaired(path, rows, timepoints)
    return Manifest(path=path.resolve(), rows=tuple(rows))


def _warn_unpaired(path: Path, rows: Sequence[ManifestRow], timepoints: Sequence[str]) -> None:
    """Log a warning per patient that lacks a timepoint: its slides run, but it has no pair."""
    if len(timepoints) < 2:
        return
    seen: dict[str, set[str]] = {}
    for row in rows:
        seen.setdefault(row.patient_id, set()).add(row.timepoint)
    for patient, present in seen.items():
        missing = [t for t in timepoints if t not in present]
        if missing:
            log.warning(
                "%s: patient %r has no %s slide (only %s): its slides are run, but it has no "
                "before/after pair to compare", path, patient, "/".join(missing),
                "/".join(t for t in timepoints if t in present),
            )


def _parse_row(path: Path, line: int, record: dict[str, str], timepoints: Sequence[str]) -> ManifestRow:
    for column in REQUIRED_COLUMNS:
        if not record.get(column):
            raise ValueError(f"{path}: line {line}: empty {column!r}")
    if record["timepoint"] not in timepoints:
        raise ValueError(
            f"{path}: line {line}: unknown timepoint {record['timepoint']!r} "
            f"(expected one of {', '.join(timepoints)})"
        )
    slide_path = Path(record["slide"]).expanduser()
    if not slide_path.is_absolute():
        slide_path = (path.parent / slide_path).resolve()
    pixel_um = None
    if record.get("pixel_um"):
        try:
            pixel_um = float(record["pixel_um"])
        except ValueError:
            pixel_um = math.nan
        if not (math.isfinite(pixel_um) and pixel_um > 0):
            raise ValueError(
                f"{path}: line {line}: pixel_um must be a positive number of µm, got {record['pixel_um']!r}"
            )
    slide_id = record.get("slide_id") or slide_id_from_path(slide_path)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", slide_id):
        raise ValueError(
            f"{path}: line {line}: slide id {slide_id!r} may hold only letters, digits, '.', '_' and '-' "
            "(it names the output folder); give a `slide_id` column"
        )
    known = set(REQUIRED_COLUMNS) | {"slide_id", "pixel_um"}
    extra = {k: v for k, v in record.items() if k not in known}
    return ManifestRow(
        slide_id=slide_id,
        patient_id=record["patient_id"],
        timepoint=record["timepoint"],
        path=slide_path,
        pixel_um=pixel_um,
        extra=extra,
        line=line,
    )
