"""Small helpers shared by the multi-task tests (tiny synthetic sources, task specs)."""
import json
import os

from nnunet_plugins.multitask.metadata import MultiTaskSpec, TaskSpec
from nnunet_plugins.synthetic import generate_dataset


def make_sources(raw, shape=(8, 16, 16)):
    """Three tiny sources with different channel counts and label sets.

    A: 1 channel (CT), 2 structures, 3 training + 1 test case
    B: 2 channels (CT, MR1), 3 structures, 3 training cases
    C: 3 channels, channel 0 renamed to an MR name (z-score), 1 structure, 2 training cases
    """
    a = generate_dataset(raw, dataset_id=11, name="A", num_cases=3, num_test=1, shape=shape, num_structures=2,
                         num_channels=1, seed=1)
    b = generate_dataset(raw, dataset_id=12, name="B", num_cases=3, num_test=0, shape=shape, num_structures=3,
                         num_channels=2, seed=2)
    c = generate_dataset(raw, dataset_id=13, name="C", num_cases=2, num_test=0, shape=shape, num_structures=1,
                         num_channels=3, seed=3)
    dj_file = os.path.join(c, "dataset.json")
    dj = json.load(open(dj_file))
    dj["channel_names"]["0"] = "T2"
    json.dump(dj, open(dj_file, "w"), indent=2)
    return a, b, c


def toy_spec(channels=(1, 2), classes=(3, 4), tags=("A", "B")) -> MultiTaskSpec:
    """A spec without files: task t has ``classes[t]`` local classes and ``channels[t]`` channels."""
    tasks, nxt = [], 1
    for tag, c, k in zip(tags, channels, classes):
        combined = (0, *range(nxt, nxt + k - 1))
        nxt += k - 1
        tasks.append(TaskSpec(tag=tag, source_dataset=f"Dataset_{tag}",
                              channel_names={str(i): "CT" if i == 0 else f"MR{i}" for i in range(c)},
                              label_names=("background", *[f"s{i}" for i in range(1, k)]),
                              label_values=(0, *[10 * i for i in range(1, k)]), combined_labels=combined))
    return MultiTaskSpec(tasks=tuple(tasks), num_input_channels=max(channels))
