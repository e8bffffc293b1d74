"""Per-source intensity normalisation, settled when datasets are combined.

nnU-Net 2.8 normalises per CHANNEL of a dataset (``channel_names`` -> CTNormalization, ZScore, ...)
with dataset-wide statistics, and normalisation schemes cannot be added from outside nnunetv2. In a
universal dataset channel 0 may be CT for one task and MR for another, so normalising in nnU-Net's
preprocessing would apply one task's statistics to another's images. Instead every source image is
normalised here with ITS source's scheme and statistics (exactly what nnU-Net would do when training
that source alone), and the combined dataset declares every channel ``noNorm``.

What matches nnU-Net (``DefaultPreprocessor`` + ``DatasetFingerprintExtractor`` + planner):

* scheme per channel from the source's ``channel_names`` via nnU-Net's own mapping;
* CT statistics: foreground voxels (label > 0) of the training cases, 10,000 seeded samples per case,
  then mean, std and the 0.5 / 99.5 percentiles of the pooled samples;
* ``use_mask_for_norm``: the planner's rule (median relative size after cropping to the nonzero region
  < 3/4, for schemes that leave the outside at zero, i.e. z-score); the mask is nnU-Net's nonzero mask
  (``create_nonzero_mask``) plus labelled voxels, exactly as ``crop_to_nonzero`` marks it.

Known difference: nnU-Net normalises after cropping to the nonzero region, so a z-scored source without
mask keeps its raw zeros outside the crop box; here the whole image is normalised, which only changes
how much background nnU-Net's preprocessing of the combined dataset crops away.
"""
from __future__ import annotations

import numpy as np

FOREGROUND_SAMPLES_PER_CASE = 10000
SAMPLING_SEED = 1234


def normalization_class(channel_name: str):
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    return get_normalization_scheme(channel_name)


def nonzero_mask(channels: np.ndarray) -> np.ndarray:
    """nnU-Net's nonzero mask of a (C, ...) image (any channel nonzero, holes filled)."""
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

    return create_nonzero_mask(channels)


def relative_size_after_cropping(mask: np.ndarray) -> float:
    if not mask.any():
        return 1.0
    idx = np.nonzero(mask)
    box = np.prod([i.max() - i.min() + 1 for i in idx], dtype=np.float64)
    return float(box / mask.size)


class IntensityStatistics:
    """Accumulates a source's fingerprint (foreground samples per channel, relative crop sizes)."""

    def __init__(self, num_channels: int):
        self.samples = [[] for _ in range(num_channels)]
        self.relative_sizes = []

    def add_case(self, channels: np.ndarray, label: np.ndarray, case_index: int) -> None:
        rng = np.random.RandomState(SAMPLING_SEED + case_index)
        fg = label > 0
        for c in range(channels.shape[0]):
            values = channels[c][fg]
            if values.size:
                self.samples[c].append(rng.choice(values, FOREGROUND_SAMPLES_PER_CASE, replace=True))
        self.relative_sizes.append(relative_size_after_cropping(nonzero_mask(channels)))

    def merge(self, other: "IntensityStatistics") -> None:
        for mine, theirs in zip(self.samples, other.samples):
            mine.extend(theirs)
        self.relative_sizes.extend(other.relative_sizes)

    def intensity_properties(self, channel: int) -> dict:
        if not self.samples[channel]:
            return {}
        v = np.concatenate(self.samples[channel]).astype(np.float64)
        return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
                "min": float(v.min()), "max": float(v.max()),
                "percentile_00_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5))}

    @property
    def median_relative_size_after_cropping(self) -> float:
        return float(np.median(self.relative_sizes)) if self.relative_sizes else 1.0


def normalization_entries(channel_names: dict, stats: IntensityStatistics, source: str) -> list[dict]:
    """Per-channel normalisation of a source, decided as nnU-Net's planner decides it."""
    entries = []
    use_mask_rule = stats.median_relative_size_after_cropping < 3 / 4.
    for c in range(len(channel_names)):
        name = channel_names[str(c)]
        cls = normalization_class(name)
        props = stats.intensity_properties(c)
        if cls.__name__ == "CTNormalization" and not props:
            raise ValueError(f"{source}: channel {c} ({name}) uses CT normalisation but no training case has "
                             f"foreground voxels to compute its statistics from")
        entries.append({"scheme": cls.__name__,
                        "use_mask_for_norm": bool(use_mask_rule and cls.leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true),
                        "intensity_properties": props})
    return entries


def normalize_channels(channels: np.ndarray, normalization: list | tuple, label: np.ndarray | None = None) -> np.ndarray:
    """Normalise a (C, ...) float image with a task's per-channel entries (nnU-Net's normaliser classes)."""
    if len(normalization) != channels.shape[0]:
        raise ValueError(f"image has {channels.shape[0]} channels, normalisation is defined for {len(normalization)}")
    out = channels.astype(np.float32, copy=True)
    seg = None
    if any(e["use_mask_for_norm"] for e in normalization):
        # the region nnU-Net's crop_to_nonzero leaves at >= 0: nonzero voxels and labelled voxels
        inside = nonzero_mask(out)
        if label is not None:
            inside |= label > 0
        seg = np.where(inside, 0, -1).astype(np.int8)
    for c, entry in enumerate(normalization):
        cls = normalization_class_by_name(entry["scheme"])
        normalizer = cls(use_mask_for_norm=bool(entry["use_mask_for_norm"]),
                         intensityproperties=dict(entry.get("intensity_properties") or {}))
        out[c] = normalizer.run(out[c], seg)
    return out


def normalization_class_by_name(name: str):
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes

    cls = getattr(schemes, name, None)
    if cls is None:
        raise ValueError(f"unknown normalisation scheme {name!r}")
    return cls
