"""Combine several nnU-Net raw datasets into ONE universal raw dataset (``nnunet-plugins combine``).

The result is a normal nnU-Net raw dataset that ``nnUNetv2_plan_and_preprocess`` and
``nnUNetv2_train`` handle as one ID:

* case names: ``<tag>_<source case>``; the tag (letters and digits) names the source task;
* labels: the disjoint union of the sources' label sets (``<tag>:<name>`` -> combined value, see
  ``metadata``), so nnU-Net preprocesses every structure, and every label value belongs to exactly one
  task. The per-task label tables go to ``dataset.json["multitask"]``;
* channels: a task with fewer channels than the widest task is padded with zero channels (files are
  still written, nnU-Net requires every channel); each task records its real channel count and
  multi-task networks use only those (UniSeg: one stem per channel count, as the official code);
* intensities: normalised per source with the source's own scheme and statistics (``intensity``); all
  combined channels are declared ``noNorm``;
* spacing and geometry: kept as in the source files. nnU-Net's planner chooses ONE target spacing for
  the combined dataset with its usual rule (median spacing over all cases, anisotropy rule) and its
  preprocessing resamples every case to it; pass ``-overwrite_target_spacing`` to
  ``nnUNetv2_plan_and_preprocess`` to fix it instead. Predictions are exported in each case's original
  geometry by nnU-Net as usual.
* test images (``imagesTs``, and ``labelsTs`` if a source has them) are converted the same way;
* unlabeled images (``imagesUn``, see ``nnunet_plugins.semi``) are converted the same way into the combined
  ``imagesUn`` (``<tag>_<case>``, so a semi-supervised multi-task trainer knows each one's source); after
  ``nnUNetv2_plan_and_preprocess``, ``nnunet-plugins semi preprocess`` preprocesses them, and
  ``nnunet-plugins semi split --per-task`` draws a labeled fraction within each source.

The dataset is built in a temporary folder next to the target and renamed into place, so an
interrupted run leaves nothing nnU-Net would accept; a rerun with the same sources and tags is a
no-op, other content needs ``overwrite=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from nnunet_plugins.atomic import atomic_directory, atomic_output
from nnunet_plugins.multitask.intensity import IntensityStatistics, normalization_entries, normalize_channels
from nnunet_plugins.multitask.metadata import (
    METADATA_KEY, TAG_PATTERN, MultiTaskSpec, TaskSpec, combined_case_name, sanitize_tag, source_label_values,
)

SITK_FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
COMBINED_FILE_ENDING = ".nii.gz"


# ---------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------
@dataclass
class SourceCase:
    case: str
    images: list
    label: str | None


@dataclass
class Source:
    folder: str
    dataset_json: dict
    tag: str
    training: list
    test: list
    unlabeled: list = ()

    @property
    def name(self) -> str:
        return os.path.basename(self.folder)


def resolve_dataset_folder(raw_root: str, dataset: str | int) -> str:
    """Folder of a raw dataset given as ID (501), name (Dataset501_X) or path."""
    text = str(dataset)
    if os.path.isdir(text) and os.path.isfile(os.path.join(text, "dataset.json")):
        return os.path.abspath(text)
    if text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        hits = [d for d in sorted(os.listdir(raw_root)) if d.startswith(prefix)
                and os.path.isdir(os.path.join(raw_root, d))]
        if len(hits) != 1:
            raise FileNotFoundError(f"dataset ID {text}: expected one folder {prefix}* in {raw_root}, found {hits}")
        return os.path.join(raw_root, hits[0])
    folder = os.path.join(raw_root, text)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no dataset {text!r} in {raw_root}")
    return folder


def list_cases(folder: str, file_ending: str, num_channels: int, where: str) -> dict:
    """{case: [channel files]} of a folder in nnU-Net's ``<case>_<cccc><ending>`` layout."""
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    cases: dict = {}
    for f in sorted(os.listdir(folder)):
        m = pattern.match(f)
        if m:
            cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, f)
    out = {}
    for case, channels in cases.items():
        if sorted(channels) != list(range(num_channels)):
            raise ValueError(f"{where}: case {case} has channels {sorted(channels)}, expected 0..{num_channels - 1}")
        out[case] = [channels[c] for c in range(num_channels)]
    return out


def load_source(folder: str, tag: str | None) -> Source:
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    name = os.path.basename(folder)
    for key in ("channel_names", "labels", "file_ending"):
        if key not in dj:
            raise ValueError(f"{folder}/dataset.json has no {key!r}")
    ending = dj["file_ending"]
    if ending not in SITK_FILE_ENDINGS:
        raise ValueError(f"{name}: file ending {ending!r} is not supported (SimpleITK formats: "
                         f"{', '.join(SITK_FILE_ENDINGS)})")
    tag = sanitize_tag(name) if tag is None else tag
    if not TAG_PATTERN.match(tag or ""):
        raise ValueError(f"{name}: task tag {tag!r} must be letters and digits only (pass --tags)")
    num_channels = len(dj["channel_names"])
    training = []
    if "dataset" in dj:
        for case, entry in dj["dataset"].items():
            images = [p if os.path.isabs(p) else os.path.join(folder, p) for p in entry["images"]]
            label = entry["label"] if os.path.isabs(entry["label"]) else os.path.join(folder, entry["label"])
            if len(images) != num_channels:
                raise ValueError(f"{name}: case {case} lists {len(images)} images, expected {num_channels}")
            training.append(SourceCase(case, images, label))
    else:
        for case, images in list_cases(os.path.join(folder, "imagesTr"), ending, num_channels,
                                       f"{name}/imagesTr").items():
            training.append(SourceCase(case, images, os.path.join(folder, "labelsTr", case + ending)))
    if not training:
        raise ValueError(f"{name} has no training cases")
    for c in training:
        for p in c.images + [c.label]:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{name}: case {c.case}: missing file {p}")
    test = []
    ts = os.path.join(folder, "imagesTs")
    if os.path.isdir(ts):
        for case, images in list_cases(ts, ending, num_channels, f"{name}/imagesTs").items():
            label = os.path.join(folder, "labelsTs", case + ending)
            test.append(SourceCase(case, images, label if os.path.isfile(label) else None))
    unlabeled = []
    un = os.path.join(folder, "imagesUn")
    if os.path.isdir(un):
        unlabeled = [SourceCase(case, images, None) for case, images in
                     list_cases(un, ending, num_channels, f"{name}/imagesUn").items()]
    return Source(folder, dj, tag, training, test, unlabeled)


# ---------------------------------------------------------------------------------------------------
# per-case work (module level: runs in worker processes)
# ---------------------------------------------------------------------------------------------------
def read_channels(files: list, where: str):
    """(C, z, y, x) float32 array and the SimpleITK image of channel 0 (geometry reference)."""
    import SimpleITK as sitk

    arrays, ref = [], None
    for f in files:
        img = sitk.ReadImage(f)
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{where}: {f} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                             f"nnU-Net datasets store one channel per file")
        if ref is None:
            ref = img
        elif img.GetSize() != ref.GetSize():
            raise ValueError(f"{where}: {f} has size {img.GetSize()}, channel 0 has {ref.GetSize()}")
        arrays.append(sitk.GetArrayFromImage(img).astype(np.float32))
    return np.stack(arrays), ref


def read_label(file: str, ref, where: str) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.ReadImage(file)
    if img.GetSize() != ref.GetSize():
        raise ValueError(f"{where}: label {file} has size {img.GetSize()}, the image {ref.GetSize()}")
    return sitk.GetArrayFromImage(img)


def remap_labels(label: np.ndarray, values: tuple, targets: tuple, where: str) -> np.ndarray:
    """Map source label values to ``targets`` (vectorised); unexpected values are an error."""
    present = np.unique(label)
    unexpected = sorted(set(int(v) for v in present) - set(values))
    if unexpected:
        raise ValueError(f"{where}: label values {unexpected} are not declared in the source's dataset.json "
                         f"(declared: {list(values)})")
    lut = np.zeros(int(max(values)) + 1, dtype=np.int64)
    lut[list(values)] = targets
    return lut[label.astype(np.int64)]


def write_image(array: np.ndarray, ref, path: str) -> None:
    """Write ``array`` with the geometry of ``ref`` atomically (temp file with the same extension)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.CopyInformation(ref)
    with atomic_output(path) as tmp:
        sitk.WriteImage(img, tmp, True)


def _statistics_job(args) -> IntensityStatistics:
    source_name, cases, num_channels, values, first_index = args
    stats = IntensityStatistics(num_channels)
    for i, (case, images, label_file) in enumerate(cases):
        where = f"{source_name} case {case}"
        channels, ref = read_channels(images, where)
        label = read_label(label_file, ref, where)
        remap_labels(label, values, values, where)  # validates the label values early
        stats.add_case(channels, label, first_index + i)
    return stats


def convert_case(task: TaskSpec, images: list, label_file: str | None, total_channels: int, out_case: str,
                 images_dir: str, labels_dir: str | None, where: str) -> None:
    """Normalise, pad and write one case (and its label, remapped to combined values)."""
    channels, ref = read_channels(images, where)
    label = read_label(label_file, ref, where) if label_file else None
    normalized = normalize_channels(channels, task.normalization, label)
    for c in range(total_channels):
        data = normalized[c] if c < normalized.shape[0] else np.zeros(normalized.shape[1:], dtype=np.float32)
        write_image(data, ref, os.path.join(images_dir, f"{out_case}_{c:04d}{COMBINED_FILE_ENDING}"))
    if label is not None and labels_dir is not None:
        combined = remap_labels(label, task.label_values, task.combined_labels, where)
        dtype = np.uint8 if max(task.combined_labels) < 256 else np.uint16
        write_image(combined.astype(dtype), ref, os.path.join(labels_dir, out_case + COMBINED_FILE_ENDING))


def _convert_job(args) -> None:
    convert_case(*args)


def _map(func, jobs: list, num_processes: int, desc: str = "", progress: bool = False) -> list:
    """``[func(j) for j in jobs]`` in ``num_processes`` processes, with the converters' progress bar."""
    from nnunet_plugins.dataset_conversion.common import progress_bar

    results = []
    with progress_bar(len(jobs), desc, progress) as bar:
        if num_processes <= 1 or len(jobs) <= 1:
            for j in jobs:
                results.append(func(j))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(num_processes, len(jobs))) as pool:
                for r in pool.map(func, jobs):
                    results.append(r)
                    bar.update()
    return results


# ---------------------------------------------------------------------------------------------------
# the command's work
# ---------------------------------------------------------------------------------------------------
def _fingerprint(sources: list) -> str:
    """Identifies the inputs of a combination (source dataset.json files, case lists, tags)."""
    h = hashlib.sha256()
    for s in sources:
        h.update(s.tag.encode())
        h.update(json.dumps(s.dataset_json, sort_keys=True).encode())
        for c in list(s.training) + list(s.test) + list(s.unlabeled):
            h.update(c.case.encode())
            for p in c.images + ([c.label] if c.label else []):
                st = os.stat(p)
                h.update(f"{os.path.basename(p)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()


def build_task_specs(sources: list, stats: list) -> MultiTaskSpec:
    tasks, next_value = [], 1
    for s, st in zip(sources, stats):
        values, names = source_label_values(s.dataset_json["labels"])
        k = len(values)
        combined = (0, *range(next_value, next_value + k - 1))
        next_value += k - 1
        tasks.append(TaskSpec(
            tag=s.tag, source_dataset=s.name, channel_names=dict(s.dataset_json["channel_names"]),
            label_names=tuple(names), label_values=tuple(values), combined_labels=combined,
            normalization=tuple(normalization_entries(s.dataset_json["channel_names"], st, s.name)),
            source_labels=dict(s.dataset_json["labels"]),
            source_regions_class_order=s.dataset_json.get("regions_class_order"),
            source_file_ending=s.dataset_json["file_ending"], num_training=len(s.training), num_test=len(s.test)))
    return MultiTaskSpec(tasks=tuple(tasks), num_input_channels=max(t.num_input_channels for t in tasks))


def combine_datasets(sources: list, dataset_id: int, name: str = "Universal", *, raw_root: str | None = None,
                     tags: list | None = None, overwrite: bool = False, num_processes: int = 1,
                     verbose: bool = True) -> str:
    """Combine the raw datasets ``sources`` (IDs, names or folders) into ``Dataset<ID>_<name>``.

    Returns the folder of the combined dataset. See the module docstring for what is written.
    """
    raw_root = raw_root or os.environ.get("nnUNet_raw")
    if not raw_root:
        raise ValueError("no raw_root given and nnUNet_raw is not set")
    if not (1 <= int(dataset_id) <= 999):
        raise ValueError(f"dataset ID must be in 1..999, got {dataset_id}")
    if not name or not re.match(r"^[A-Za-z0-9_\-]+$", name):
        raise ValueError(f"dataset name must be letters, digits, '-' or '_', got {name!r}")
    if not sources:
        raise ValueError("no source datasets given")
    if tags is not None and len(tags) != len(sources):
        raise ValueError(f"{len(tags)} tags for {len(sources)} source datasets")
    folder_name = f"Dataset{int(dataset_id):03d}_{name}"
    target = os.path.join(raw_root, folder_name)

    folders = [resolve_dataset_folder(raw_root, s) for s in sources]
    if os.path.abspath(target) in [os.path.abspath(f) for f in folders]:
        raise ValueError(f"the combined dataset {folder_name} cannot also be a source")
    if len(set(folders)) != len(folders):
        raise ValueError("a source dataset is given twice")
    loaded = [load_source(f, None if tags is None else tags[i]) for i, f in enumerate(folders)]
    tag_list = [s.tag for s in loaded]
    if len(set(tag_list)) != len(tag_list):
        raise ValueError(f"task tags must be unique, got {tag_list}; pass --tags")
    fingerprint = _fingerprint(loaded)

    if os.path.isdir(target):
        try:
            with open(os.path.join(target, "dataset.json")) as f:
                existing = json.load(f)
        except (OSError, json.JSONDecodeError):
            existing = {}
        if existing.get("combined_from", {}).get("fingerprint") == fingerprint and not overwrite:
            if verbose:
                print(f"{target} is already the combination of these sources; nothing to do")
            return target
        if not overwrite:
            raise ValueError(f"{target} already exists with other content; pass --overwrite to replace it")
    for other in os.listdir(raw_root):
        if other.startswith(f"Dataset{int(dataset_id):03d}_") and other != folder_name \
                and os.path.isdir(os.path.join(raw_root, other)):
            raise ValueError(f"dataset ID {dataset_id} is already used by {os.path.join(raw_root, other)}")

    # pass 1: per-source intensity statistics (nnU-Net's fingerprint, per source)
    stats = []
    for s in loaded:
        values, _ = source_label_values(s.dataset_json["labels"])
        n_ch = len(s.dataset_json["channel_names"])
        chunks = np.array_split(np.arange(len(s.training)), max(1, min(num_processes, len(s.training))))
        jobs = [(s.name, [(s.training[i].case, s.training[i].images, s.training[i].label) for i in chunk],
                 n_ch, tuple(values), int(chunk[0]) if len(chunk) else 0) for chunk in chunks if len(chunk)]
        if verbose:
            print(f"{s.name}: statistics of {len(s.training)} training cases")
        merged = IntensityStatistics(n_ch)
        for part in _map(_statistics_job, jobs, num_processes, f"statistics of {s.name}", verbose):
            merged.merge(part)
        stats.append(merged)
    spec = build_task_specs(loaded, stats)

    # pass 2: convert into a temporary folder, then rename into place
    with atomic_directory(raw_root, folder_name) as tmp:
        dirs = {k: os.path.join(tmp, k) for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUn")}
        for d in dirs.values():
            os.makedirs(d)
        jobs = []
        for s, task in zip(loaded, spec.tasks):
            for c in s.training:
                out = combined_case_name(s.tag, c.case)
                jobs.append((task, c.images, c.label, spec.num_input_channels, out, dirs["imagesTr"],
                             dirs["labelsTr"], f"{s.name} case {c.case}"))
            for c in s.test:
                out = combined_case_name(s.tag, c.case)
                jobs.append((task, c.images, c.label, spec.num_input_channels, out, dirs["imagesTs"],
                             dirs["labelsTs"], f"{s.name} test case {c.case}"))
            for c in s.unlabeled:
                jobs.append((task, c.images, None, spec.num_input_channels, combined_case_name(s.tag, c.case),
                             dirs["imagesUn"], None, f"{s.name} unlabeled case {c.case}"))
        if verbose:
            print(f"writing {len(jobs)} cases")
        _map(_convert_job, jobs, num_processes, f"writing {folder_name}", verbose)
        for sub in ("labelsTs", "imagesTs", "imagesUn"):
            if not os.listdir(dirs[sub]):
                os.rmdir(dirs[sub])
        dataset_json = {
            "channel_names": {str(c): "noNorm" for c in range(spec.num_input_channels)},
            "labels": spec.combined_labels_dict(),
            "numTraining": sum(len(s.training) for s in loaded),
            "file_ending": COMBINED_FILE_ENDING,
            "name": name,
            "description": "universal dataset combined by nnunet-plugins from " + ", ".join(s.name for s in loaded)
                           + "; images normalised per source (all channels noNorm); labels are the disjoint union "
                             "of the sources' label sets; task tables under 'multitask'",
            METADATA_KEY: spec.to_json(),
            "combined_from": {"sources": [s.name for s in loaded], "tags": tag_list, "fingerprint": fingerprint},
        }
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(dataset_json, f, indent=2)
    if verbose:
        print(f"wrote {target}: {spec.num_tasks} tasks ({', '.join(tag_list)}), "
              f"{spec.num_combined_labels - 1} structures, {spec.num_input_channels} channels")
    return target


def convert_source_images(spec: MultiTaskSpec, task: int, input_folder: str, output_folder: str,
                          num_processes: int = 1) -> list[str]:
    """Convert raw images of source task ``task`` (source layout and file ending) into the combined
    format (normalised, padded, ``<tag>_<case>`` names) in ``output_folder``; returns the case names."""
    t = spec.tasks[task]
    cases = list_cases(input_folder, t.source_file_ending, t.num_input_channels, input_folder)
    if not cases:
        raise FileNotFoundError(f"no images '<case>_0000{t.source_file_ending}' for task {t.tag!r} in {input_folder}")
    os.makedirs(output_folder, exist_ok=True)
    jobs, names = [], []
    for case, images in cases.items():
        out = combined_case_name(t.tag, case)
        names.append(out)
        jobs.append((t, images, None, spec.num_input_channels, out, output_folder, None, f"{input_folder} case {case}"))
    _map(_convert_job, jobs, num_processes)
    return names
