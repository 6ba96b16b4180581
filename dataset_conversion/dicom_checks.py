"""Per-slice checks of DICOM CT slices read by GDCM (through SimpleITK): values that are not finite once rescaled
are refused; a slice whose rescale tags are missing or unreadable, or whose pixel spacing is unlike its neighbours',
is converted as GDCM reads it and warned of by file."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nndiffseg.dataset_conversion.common import refuse_non_finite

RESCALE_TAGS = (("0028|1053", "RescaleSlope", "slope", 1), ("0028|1052", "RescaleIntercept", "intercept", 0))
MAX_WARNINGS_SHOWN = 20


@dataclass(frozen=True)
class DicomSliceInfo:
    path: Path
    spacing: tuple[float, float]  # (x, y) in mm, as GDCM reads it
    anomalies: tuple[str, ...] = ()  # found in the file alone (see rescale_anomalies)


def _tag_text(reader: sitk.ImageFileReader, tag: str) -> str | None:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def rescale_anomalies(reader: sitk.ImageFileReader) -> tuple[str, ...]:
    """What is wrong with the rescale tags of the slice ``reader`` read: for a missing tag, or one that is no
    number ('nan', 'inf'), GDCM uses slope 1 / intercept 0 in its place (checked with GDCM 3.2)."""
    missing, unreadable, assumed = [], [], []
    for tag, name, word, default in RESCALE_TAGS:
        text = _tag_text(reader, tag)
        if text is None:
            missing.append(name)
        elif not _is_number(text):
            unreadable.append(f"{name} '{text}'")
        else:
            continue
        assumed.append(f"{word} {default}")
    if not assumed:
        return ()
    problems = ([f"no {'/'.join(missing)}"] if missing else []) + [f"{u} is not a number" for u in unreadable]
    return (f"{'; '.join(problems)}: {' and '.join(assumed)} assumed, so its values may not be HU",)


def refuse_non_finite_hu(values: np.ndarray, path: Path, reader: sitk.ImageFileReader) -> None:
    """A CT slice decodes to finite Hounsfield units; NaN or Inf (e.g. from a corrupt RescaleSlope) is refused."""
    tags = ", ".join(f"{name} {_tag_text(reader, tag)}" for tag, name, _, _ in RESCALE_TAGS)
    refuse_non_finite(values, f"DICOM {path}", f" once rescaled ({tags}): not a CT slice in Hounsfield units")


def _spacing_text(spacing: tuple[float, float]) -> str:
    return f"{spacing[0]:g} x {spacing[1]:g} mm"


def _neighbours(index: int, count: int) -> tuple[int, int]:
    """The two slices nearest in id order: either side, or the next two at an end."""
    if index == 0:
        return 1, 2
    if index == count - 1:
        return count - 2, count - 3
    return index - 1, index + 1


def spacing_outliers(slices: list[DicomSliceInfo]) -> dict[int, str]:
    """index -> anomaly for each slice (in id order) whose pixel spacing differs from its two neighbours', which
    agree with each other. Slices of different patients may differ anyway; one slice off a run is suspect."""
    outliers = {}
    for index, item in enumerate(slices if len(slices) >= 3 else []):
        first, second = (slices[i] for i in _neighbours(index, len(slices)))
        if np.allclose(first.spacing, second.spacing, rtol=1e-6) and not np.allclose(item.spacing, first.spacing,
                                                                                     rtol=1e-6):
            outliers[index] = (f"pixel spacing {_spacing_text(item.spacing)} unlike its neighbours' "
                               f"{_spacing_text(first.spacing)} ({first.path.name}, {second.path.name}); "
                               f"converted with its own spacing")
    return outliers


def anomaly_warnings(slices: list[DicomSliceInfo]) -> list[str]:
    """One WARNING line per DICOM slice (given in id order) with anomalies, at most MAX_WARNINGS_SHOWN of them."""
    outliers = spacing_outliers(slices)
    affected = [(item.path, item.anomalies + ((outliers[i],) if i in outliers else ()))
                for i, item in enumerate(slices) if item.anomalies or i in outliers]
    lines = [f"WARNING: DICOM {path}: {'; '.join(anomalies)}" for path, anomalies in affected[:MAX_WARNINGS_SHOWN]]
    if len(affected) > MAX_WARNINGS_SHOWN:
        lines.append(f"... and {len(affected) - MAX_WARNINGS_SHOWN} more DICOM files with such anomalies")
    return lines
