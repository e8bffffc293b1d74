"""Task metadata of a universal (multi-task) dataset: what each source task is, in data, not code.

The metadata lives in the combined dataset's ``dataset.json`` under the key ``"multitask"`` (nnU-Net
ignores keys it does not know and copies dataset.json into the preprocessed and results folders, so
the trainer and the predictor see it). ``MultiTaskTrainer`` also copies it into the plans it saves in
the model folder (key ``"multitask"``), because nnU-Net's inference builds the network from the plans
only (``build_network_architecture`` never sees dataset.json).

Three label spaces exist per task ``t`` (index into ``tasks``):

* source values: the integer label values written in the source dataset's files
  (``label_values[i]``);
* local indices ``0 .. K_t-1``: the task's own classes, background first (``label_names[i]``). Loss,
  network outputs and task-conditioned predictions use these;
* combined values: the combined dataset's union label space, disjoint per task
  (``combined_labels[i]``; 0 is the shared background). Every structure of every task has its own
  combined value, so a combined label tells which task annotates it, and no structure of one task is
  ever merged with (or trained as the background of) a structure of another.

Pure Python + numpy; importing this module does not import torch or nnU-Net.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

METADATA_KEY = "multitask"
METADATA_FORMAT = 1
# a tag is the case-name prefix that identifies a case's task: letters and digits only, so that the
# tag is exactly the part of a combined case name before its first underscore
TAG_PATTERN = re.compile(r"^[A-Za-z0-9]+$")


def sanitize_tag(name: str) -> str:
    """A tag from a dataset name: 'Dataset501_KiTS-21' -> 'KiTS21' (letters and digits only)."""
    if re.match(r"^Dataset\d{3}_", name):
        name = name[len("Dataset000_"):]
    return re.sub(r"[^A-Za-z0-9]", "", name)


def combined_case_name(tag: str, source_case: str) -> str:
    return f"{tag}_{source_case}" if tag else source_case


def split_case_name(case: str) -> tuple[str, str]:
    """(tag, source case) of a combined case name; the tag ends at the first underscore."""
    tag, sep, rest = case.partition("_")
    if not sep or not rest:
        raise KeyError(f"case {case!r} has no task prefix: combined case names are '<tag>_<source case>'")
    return tag, rest


def source_label_values(labels: dict) -> tuple[list[int], list[str]]:
    """Integer label values of a dataset.json ``labels`` dict (regions flattened), with a name for each.

    Returns (values sorted ascending with 0 first, names). A value named by an integer entry (or a
    one-element region) keeps that name; values that only occur inside multi-value regions are
    called ``label_<v>``.
    """
    values: set[int] = set()
    names: dict[int, str] = {}
    for name, value in labels.items():
        if name == "ignore":
            raise ValueError("datasets with an 'ignore' label are not supported by the multi-task machinery yet")
        vals = list(value) if isinstance(value, (list, tuple)) else [value]
        try:
            vals = [int(v) for v in vals]
        except (TypeError, ValueError) as e:
            raise ValueError(f"label {name!r} has a non-integer value {value!r}") from e
        values.update(vals)
        if len(vals) == 1:
            names.setdefault(vals[0], name)
    if 0 not in values or names.get(0) != "background":
        raise ValueError("labels must declare 'background': 0")
    ordered = sorted(values)
    return ordered, [names.get(v, f"label_{v}") for v in ordered]


@dataclass(frozen=True)
class TaskSpec:
    """One source task of a universal dataset (see the module docstring for the label spaces)."""

    tag: str
    source_dataset: str
    channel_names: dict                  # the source's channel_names ({"0": "CT", ...})
    label_names: tuple                   # local index -> name (index 0 = "background")
    label_values: tuple                  # local index -> source label value
    combined_labels: tuple               # local index -> combined label value (index 0 -> 0)
    normalization: tuple = ()            # per source channel: {"scheme", "use_mask_for_norm", "intensity_properties"}
    source_labels: dict = field(default_factory=dict)  # the source's "labels" entry, verbatim
    source_regions_class_order: list | None = None
    source_file_ending: str = ".nii.gz"
    num_training: int = 0
    num_test: int = 0

    @property
    def num_classes(self) -> int:
        """Local classes including background (K_t)."""
        return len(self.label_values)

    @property
    def num_input_channels(self) -> int:
        return len(self.channel_names)

    @property
    def local_labels(self) -> dict:
        """A plain (softmax) nnU-Net labels dict over the local indices."""
        out, seen = {}, set()
        for i, name in enumerate(self.label_names):
            key = name if name not in seen else f"{name}_{i}"
            seen.add(key)
            out[key] = i
        return out

    def validate(self) -> None:
        if self.tag and not TAG_PATTERN.match(self.tag):
            raise ValueError(f"task tag {self.tag!r} must contain letters and digits only")
        k = len(self.label_values)
        if k < 2 or len(self.label_names) != k or len(self.combined_labels) != k:
            raise ValueError(f"task {self.tag!r}: label_values, label_names and combined_labels must have the same "
                             f"length >= 2, got {len(self.label_values)}, {len(self.label_names)}, "
                             f"{len(self.combined_labels)}")
        if self.label_values[0] != 0 or self.combined_labels[0] != 0:
            raise ValueError(f"task {self.tag!r}: local class 0 must be background (source value 0, combined value 0)")
        if len(set(self.label_values)) != k or len(set(self.combined_labels)) != k:
            raise ValueError(f"task {self.tag!r}: label values must be unique")
        if self.num_input_channels < 1:
            raise ValueError(f"task {self.tag!r} has no input channels")
        if self.normalization and len(self.normalization) != self.num_input_channels:
            raise ValueError(f"task {self.tag!r}: {len(self.normalization)} normalisation entries for "
                             f"{self.num_input_channels} channels")

    def to_json(self) -> dict:
        d = asdict(self)
        for key in ("label_names", "label_values", "combined_labels", "normalization"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TaskSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown task metadata keys {sorted(unknown)}")
        d = dict(d)
        for key in ("label_names", "label_values", "combined_labels", "normalization"):
            if key in d:
                d[key] = tuple(d[key])
        d["label_values"] = tuple(int(v) for v in d["label_values"])
        d["combined_labels"] = tuple(int(v) for v in d["combined_labels"])
        spec = cls(**d)
        spec.validate()
        return spec


@dataclass(frozen=True)
class MultiTaskSpec:
    """All tasks of a universal dataset; ``tasks[t]`` is task id ``t`` (the id networks receive)."""

    tasks: tuple
    num_input_channels: int
    implicit: bool = False   # True: a plain nnU-Net dataset seen as one task (no "multitask" metadata)

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("a multi-task dataset needs at least one task")
        tags = [t.tag for t in self.tasks]
        if len(set(tags)) != len(tags):
            raise ValueError(f"task tags must be unique, got {tags}")
        if self.implicit and len(self.tasks) != 1:
            raise ValueError("an implicit task specification has exactly one task")
        for t in self.tasks:
            t.validate()
            if t.num_input_channels > self.num_input_channels:
                raise ValueError(f"task {t.tag!r} has {t.num_input_channels} channels but the dataset only "
                                 f"{self.num_input_channels}")
        used = [v for t in self.tasks for v in t.combined_labels[1:]]
        if len(set(used)) != len(used):
            raise ValueError("combined label values of different tasks overlap; every task must own its values")

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def max_num_classes(self) -> int:
        """The largest class count (background included) of any task: UniSeg's output channel count."""
        return max(t.num_classes for t in self.tasks)

    @property
    def num_combined_labels(self) -> int:
        """Number of combined label values, background included (combined values are 0..N-1)."""
        return 1 + max(max(t.combined_labels) for t in self.tasks)

    @property
    def task_input_channels(self) -> tuple:
        return tuple(t.num_input_channels for t in self.tasks)

    @property
    def task_num_classes(self) -> tuple:
        return tuple(t.num_classes for t in self.tasks)

    @property
    def tags(self) -> tuple:
        return tuple(t.tag for t in self.tasks)

    # ---- cases -------------------------------------------------------------------------------------
    def task_index(self, tag: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.tag == tag:
                return i
        raise KeyError(f"unknown task {tag!r}; tasks of this dataset: {', '.join(self.tags)}")

    def resolve_task(self, task: str | int) -> int:
        """A task given as tag or as integer id (also as a digit string) -> task id."""
        if isinstance(task, (int, np.integer)):
            if not 0 <= int(task) < self.num_tasks:
                raise KeyError(f"task id {task} out of range 0..{self.num_tasks - 1}")
            return int(task)
        if task in self.tags:
            return self.task_index(task)
        if str(task).isdigit():
            return self.resolve_task(int(task))
        return self.task_index(task)

    def task_of_case(self, case: str) -> int:
        """Task id of a combined case name (its prefix up to the first underscore)."""
        if self.implicit:
            return 0
        tag, _ = split_case_name(case)
        try:
            return self.task_index(tag)
        except KeyError:
            raise KeyError(f"case {case!r}: prefix {tag!r} is not a task of this dataset "
                           f"(tasks: {', '.join(self.tags)})") from None

    def source_case(self, case: str) -> str:
        return case if self.implicit else split_case_name(case)[1]

    def case_tasks(self, cases: Iterable[str]) -> np.ndarray:
        return np.asarray([self.task_of_case(c) for c in cases], dtype=np.int64)

    # ---- label look-up tables (vectorised label conversion: lut[labels]) ---------------------------
    def combined_to_local_lut(self) -> np.ndarray:
        """(T, N) int64: ``lut[t, combined value]`` = local index for task t's values, 0 elsewhere."""
        lut = np.zeros((self.num_tasks, self.num_combined_labels), dtype=np.int64)
        for t, task in enumerate(self.tasks):
            lut[t, list(task.combined_labels)] = np.arange(task.num_classes)
        return lut

    def local_to_combined_lut(self) -> np.ndarray:
        """(T, K_max) int64: ``lut[t, local index]`` = combined value (0 past the task's classes)."""
        lut = np.zeros((self.num_tasks, self.max_num_classes), dtype=np.int64)
        for t, task in enumerate(self.tasks):
            lut[t, :task.num_classes] = task.combined_labels
        return lut

    def combined_to_source_lut(self, task: int) -> np.ndarray:
        """(N,) int64: combined value -> source value of task ``task``; -1 for values of other tasks."""
        lut = np.full(self.num_combined_labels, -1, dtype=np.int64)
        t = self.tasks[task]
        lut[list(t.combined_labels)] = t.label_values
        return lut

    def combined_labels_dict(self) -> dict:
        """The combined dataset's ``labels`` entry: ``<tag>:<name>`` -> combined value."""
        out = {"background": 0}
        for t in self.tasks:
            for name, value in zip(t.label_names[1:], t.combined_labels[1:]):
                out[f"{t.tag}:{name}" if t.tag else name] = int(value)
        return out

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": METADATA_FORMAT, "num_input_channels": self.num_input_channels,
                "tasks": [t.to_json() for t in self.tasks]}

    @classmethod
    def from_json(cls, d: dict) -> "MultiTaskSpec":
        if not isinstance(d, dict) or "tasks" not in d:
            raise ValueError(f"'{METADATA_KEY}' metadata must be an object with a 'tasks' list")
        if d.get("format", METADATA_FORMAT) != METADATA_FORMAT:
            raise ValueError(f"unsupported '{METADATA_KEY}' metadata format {d.get('format')!r} "
                             f"(this version reads format {METADATA_FORMAT})")
        return cls(tasks=tuple(TaskSpec.from_json(t) for t in d["tasks"]),
                   num_input_channels=int(d["num_input_channels"]))

    @classmethod
    def from_dataset_json(cls, dataset_json: dict, allow_implicit: bool = True) -> "MultiTaskSpec":
        """The tasks of a dataset.json: its ``"multitask"`` entry, or (``allow_implicit``) one task.

        A plain nnU-Net dataset (no ``"multitask"`` key) is one task whose local, source and
        combined labels coincide, so every multi-task trainer also trains single datasets.
        """
        if METADATA_KEY in dataset_json:
            spec = cls.from_json(dataset_json[METADATA_KEY])
            n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
            if n_channels and n_channels != spec.num_input_channels:
                raise ValueError(f"dataset.json declares {n_channels} channels but its '{METADATA_KEY}' metadata "
                                 f"{spec.num_input_channels}")
            return spec
        if not allow_implicit:
            raise ValueError(f"dataset.json has no '{METADATA_KEY}' entry; combine datasets with "
                             f"`nnunet-plugins combine` first")
        labels = dataset_json.get("labels")
        if not labels:
            raise ValueError("dataset.json has no 'labels'")
        values, names = source_label_values(labels)
        if values != list(range(len(values))):
            raise ValueError(f"label values of a single-task dataset must be consecutive 0..N-1, got {values}")
        channels = dataset_json.get("channel_names", dataset_json.get("modality"))
        if not channels:
            raise ValueError("dataset.json has no 'channel_names'")
        task = TaskSpec(tag="", source_dataset=str(dataset_json.get("name", "")), channel_names=dict(channels),
                        label_names=tuple(names), label_values=tuple(values), combined_labels=tuple(values),
                        source_labels=dict(labels), source_regions_class_order=dataset_json.get("regions_class_order"),
                        source_file_ending=dataset_json.get("file_ending", ".nii.gz"),
                        num_training=int(dataset_json.get("numTraining", 0)))
        return cls(tasks=(task,), num_input_channels=len(channels), implicit=True)

    @classmethod
    def from_plans(cls, plans: dict) -> "MultiTaskSpec":
        if METADATA_KEY not in plans:
            raise RuntimeError(f"the plans carry no '{METADATA_KEY}' entry: multi-task networks must be built by a "
                               f"MultiTaskTrainer (it copies the task metadata into the plans of the model folder)")
        d = plans[METADATA_KEY]
        spec = cls.from_json(d)
        if d.get("implicit"):
            spec = cls(tasks=spec.tasks, num_input_channels=spec.num_input_channels, implicit=True)
        return spec

    def to_plans_entry(self) -> dict:
        d = self.to_json()
        if self.implicit:
            d["implicit"] = True
        return d
