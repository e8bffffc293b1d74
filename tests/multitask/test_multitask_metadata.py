import numpy as np
import pytest

from multitask_helpers import toy_spec
from nnunet_plugins.multitask.metadata import (
    MultiTaskSpec, TaskSpec, sanitize_tag, source_label_values, split_case_name,
)


def test_label_tables_and_round_trip():
    spec = toy_spec(channels=(1, 2, 3), classes=(3, 4, 2), tags=("A", "B", "C"))
    assert spec.num_tasks == 3 and spec.max_num_classes == 4 and spec.num_combined_labels == 1 + 2 + 3 + 1
    assert spec.task_input_channels == (1, 2, 3)
    assert spec.combined_labels_dict() == {"background": 0, "A:s1": 1, "A:s2": 2, "B:s1": 3, "B:s2": 4,
                                           "B:s3": 5, "C:s1": 6}
    c2l = spec.combined_to_local_lut()
    # task B's structures 3, 4, 5 are its local 1, 2, 3; everything of other tasks is 0 (not annotated by B)
    np.testing.assert_array_equal(c2l[1], [0, 0, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(spec.local_to_combined_lut()[1], [0, 3, 4, 5])
    np.testing.assert_array_equal(spec.local_to_combined_lut()[2], [0, 6, 0, 0])
    np.testing.assert_array_equal(spec.combined_to_source_lut(1), [0, -1, -1, 10, 20, 30, -1])
    # every combined value converts back to itself through its own task
    for t, task in enumerate(spec.tasks):
        for local, value in enumerate(task.combined_labels):
            assert spec.local_to_combined_lut()[t, c2l[t, value]] == value
    again = MultiTaskSpec.from_json(spec.to_json())
    assert again == spec


def test_case_names_and_tasks():
    spec = toy_spec()
    assert split_case_name("B_case_007") == ("B", "case_007")
    assert spec.task_of_case("B_case_007") == 1 and spec.source_case("B_case_007") == "case_007"
    assert spec.resolve_task("B") == 1 and spec.resolve_task(0) == 0 and spec.resolve_task("1") == 1
    with pytest.raises(KeyError, match="not a task of this dataset"):
        spec.task_of_case("Z_case")
    with pytest.raises(KeyError, match="no task prefix"):
        spec.task_of_case("nounderscore")
    assert sanitize_tag("Dataset501_KiTS-21") == "KiTS21"


def test_implicit_single_task_from_plain_dataset_json():
    dj = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumor": 2}, "numTraining": 4,
          "file_ending": ".nii.gz"}
    spec = MultiTaskSpec.from_dataset_json(dj)
    assert spec.implicit and spec.num_tasks == 1 and spec.task_of_case("anything_at_all") == 0
    np.testing.assert_array_equal(spec.combined_to_local_lut()[0], [0, 1, 2])
    with pytest.raises(ValueError, match="combine"):
        MultiTaskSpec.from_dataset_json(dj, allow_implicit=False)
    back = MultiTaskSpec.from_plans({"multitask": spec.to_plans_entry()})
    assert back.implicit and back.tasks == spec.tasks


def test_invalid_metadata_is_rejected_clearly():
    spec = toy_spec()
    d = spec.to_json()
    d["tasks"][1]["combined_labels"] = [0, 1, 7, 8]  # overlaps task A's value 1
    with pytest.raises(ValueError, match="overlap"):
        MultiTaskSpec.from_json(d)
    d = spec.to_json()
    d["tasks"][0]["tag"] = "A_x"
    with pytest.raises(ValueError, match="letters and digits"):
        MultiTaskSpec.from_json(d)
    with pytest.raises(RuntimeError, match="MultiTaskTrainer"):
        MultiTaskSpec.from_plans({})
    with pytest.raises(ValueError, match="ignore"):
        source_label_values({"background": 0, "a": 1, "ignore": 2})
    # regions: integer values flattened, named where an integer entry names them
    values, names = source_label_values({"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2})
    assert values == [0, 1, 2, 3] and names == ["background", "label_1", "tumor", "label_3"]
    with pytest.raises(ValueError):
        TaskSpec(tag="A", source_dataset="x", channel_names={"0": "CT"}, label_names=("background",),
                 label_values=(0,), combined_labels=(0,)).validate()
