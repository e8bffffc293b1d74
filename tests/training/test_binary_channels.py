"""Binary sigmoid channels of a task from its nnU-Net labels, and back to a label map."""
import numpy as np
import pytest
import torch

from nnunet_plugins.training.binary_channels import (
    BinaryChannel, BinaryChannelLabelManager, binary_channels_from_labels,
)


def test_region_dataset_gives_nested_channels():
    channels = binary_channels_from_labels({"background": 0, "liver": [1, 2], "tumour": 2}, [1, 2])
    assert channels == [BinaryChannel("liver", (1, 2), 1), BinaryChannel("tumour", (2,), 2)]


def test_plain_dataset_gives_one_channel_per_label():
    channels = binary_channels_from_labels({"background": 0, "spleen": 1, "kidney": 3})
    assert channels == [BinaryChannel("spleen", (1,), 1), BinaryChannel("kidney", (3,), 3)]


@pytest.mark.parametrize("labels,order,match", [
    ({"liver": 1}, None, "background"),
    ({"background": 0}, None, "no foreground"),
    ({"background": 0, "a": [1, 2], "b": 2}, None, "regions_class_order"),
    ({"background": 0, "a": [1, 2], "b": 2}, [1], "regions_class_order"),
    ({"background": 0, "a": "x"}, None, "non-integer"),
    ({"background": 0, "a": 1, "ignore": 2}, None, "ignore"),
    ({"background": 0, "a": [0, 1]}, [1], "positive"),
])
def test_errors_name_the_source(labels, order, match):
    with pytest.raises(ValueError, match=match) as info:
        binary_channels_from_labels(labels, order, where="Dataset601_X/dataset.json")
    assert "Dataset601_X/dataset.json" in str(info.value)


def test_label_manager_paints_channels_in_order():
    # organ includes tumour: where both channels fire the tumour (painted last) wins
    lm = BinaryChannelLabelManager(binary_channels_from_labels({"background": 0, "liver": [1, 2], "tumour": 2}, [1, 2]))
    assert lm.has_regions and lm.num_segmentation_heads == 2
    logits = torch.tensor([[-5.0, 5.0, 5.0, -5.0], [-5.0, -5.0, 5.0, 5.0]]).view(2, 1, 4)
    assert lm.convert_logits_to_segmentation(logits).flatten().tolist() == [0, 1, 2, 2]
    # one-value channels (plain labels) are handled as regions too (nnU-Net alone would use softmax)
    lm = BinaryChannelLabelManager(binary_channels_from_labels({"background": 0, "spleen": 1, "kidney": 3}))
    assert lm.has_regions and lm.num_segmentation_heads == 2 and lm.foreground_regions == [(1,), (3,)]
    seg = lm.convert_logits_to_segmentation(np.array([[3.0, -3.0, 3.0], [-3.0, 3.0, 3.0]]).reshape(2, 3, 1))
    assert np.asarray(seg).ravel().tolist() == [1, 3, 3]
    # padding outside the cropped box becomes background for region managers
    probs = lm.revert_cropping_on_probabilities(np.ones((2, 1, 1), dtype=np.float32), [[1, 2], [0, 1]], (3, 1))
    assert probs[:, 0].sum() == 0 and probs[:, 1].sum() == 2
