"""BA-Net boundary targets: exact voxels on hand-made volumes, equivalence with the per-level definition,
and their place in nnU-Net v2's transform pipeline."""
import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from scipy import ndimage

from nnunet_plugins.training.boundary import BoundaryTargetTransform, boundary_target, inner_boundary


def bdr(labels):
    arr = np.ascontiguousarray(labels)
    return inner_boundary(torch.from_numpy(arr).to(torch.int16), arr.ndim).numpy().astype(int)


def per_level_reference(labels):
    """The definition, literally: for each present label level except the largest, mask(label > level)
    minus its grey erosion with a full 3^d footprint (reflecting border), union, binarised."""
    out = np.zeros(labels.shape, bool)
    present = np.unique(labels)
    for level in present[:-1]:
        mask = (labels > level).astype(np.uint8)
        eroded = ndimage.grey_erosion(mask, footprint=np.ones((3,) * labels.ndim, bool), mode="reflect")
        out |= (mask - eroded) > 0
    return out


def test_square_in_background_gives_its_one_voxel_inner_ring():
    lab = np.zeros((7, 7), int)
    lab[2:5, 2:5] = 1
    expected = np.zeros((7, 7), int)
    expected[2:5, 2:5] = 1
    expected[3, 3] = 0
    assert np.array_equal(bdr(lab), expected)


def test_cube_in_background_3d():
    lab = np.zeros((6, 6, 6), int)
    lab[1:5, 1:5, 1:5] = 2
    expected = np.zeros_like(lab)
    expected[1:5, 1:5, 1:5] = 1
    expected[2:4, 2:4, 2:4] = 0  # 4^3 - 2^3 = 56 contour voxels
    got = bdr(lab)
    assert np.array_equal(got, expected) and got.sum() == 56


def test_class_interface_marks_only_the_higher_label_and_not_the_patch_border():
    # no background in the patch: label 1 on the left, label 3 on the right, both touching the border
    lab = np.array([[1, 1, 1, 3, 3, 3]] * 4)
    expected = np.array([[0, 0, 0, 1, 0, 0]] * 4)
    assert np.array_equal(bdr(lab), expected)
    # the same, swapped: now the left (higher) side is marked
    assert np.array_equal(bdr(lab[:, ::-1]), expected[:, ::-1])


def test_structure_touching_the_border_is_open_there():
    lab = np.zeros((5, 5), int)
    lab[:, :3] = 1
    expected = np.zeros((5, 5), int)
    expected[:, 2] = 1  # only the side facing the background; the patch border is not a boundary
    assert np.array_equal(bdr(lab), expected)


def test_nested_labels_and_diagonal_neighbours():
    lab = np.zeros((9, 9), int)
    lab[1:8, 1:8] = 1
    lab[3:6, 3:6] = 2
    lab[4, 4] = 4  # kidney / tumour style nesting, centre voxel of a third label
    expected = np.zeros((9, 9), int)
    expected[1:8, 1:8] = 1
    expected[2:7, 2:7] = 0  # interior of label 1 (its contour is the outer ring only)
    expected[3:6, 3:6] = 1  # ring of label 2 next to label 1
    expected[4, 4] = 1  # label 4 surrounded by label 2
    assert np.array_equal(bdr(lab), expected)
    # a single voxel touching a lower label only diagonally is still marked (3x3 footprint)
    lab = np.full((3, 3), 2)
    lab[0, 0] = 1
    assert bdr(lab)[1, 1] == 1 and bdr(lab).sum() == 3  # (0,1), (1,0), (1,1)


def test_uniform_and_empty_patches_have_no_boundary():
    assert bdr(np.zeros((4, 5, 6), int)).sum() == 0
    assert bdr(np.full((4, 5), 3)).sum() == 0


@pytest.mark.parametrize("seed", range(6))
def test_equals_the_per_level_definition_on_random_label_maps(seed):
    rng = np.random.default_rng(seed)
    shape = (5, 7, 6) if seed % 2 else (9, 11)
    lab = rng.integers(0, 2 + seed % 4, size=shape)
    lab = ndimage.median_filter(lab, size=2) if seed % 3 else lab  # blobs as well as salt-and-pepper
    assert np.array_equal(bdr(lab).astype(bool), per_level_reference(lab))


def test_equals_scikit_image_erosion_as_the_official_code_uses_it():
    morphology = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(7)
    for shape in [(6, 8, 7), (12, 10)]:
        lab = ndimage.median_filter(rng.integers(0, 5, size=shape), size=2)
        ref = np.zeros(shape, bool)
        for level in np.unique(lab)[:-1]:
            mask = (lab > level).astype(float)
            ref |= (mask - morphology.erosion(mask, np.ones((3,) * lab.ndim))) > 0
        assert np.array_equal(bdr(lab).astype(bool), ref)


def test_leading_axes_are_independent_maps():
    rng = np.random.default_rng(1)
    lab = torch.from_numpy(rng.integers(0, 3, size=(2, 1, 5, 6, 7)))
    got = inner_boundary(lab, 3)
    for b in range(2):
        assert torch.equal(got[b, 0], inner_boundary(lab[b, 0], 3))


def test_ignore_label_voxels_get_the_ignore_value():
    lab = torch.zeros((6, 6), dtype=torch.int16)
    lab[1:4, 1:4] = 1
    lab[:, 5] = 9  # unannotated column
    target = boundary_target(lab, 2, ignore_label=9, ignore_value=2)
    assert target.dtype == torch.int16
    assert (target[:, 5] == 2).all()
    assert torch.equal(target[:, :5], boundary_target(lab[:, :5], 2)[:, :5])


def test_transform_appends_the_boundary_channel():
    seg = torch.zeros((1, 6, 6, 6), dtype=torch.int16)
    seg[0, 1:5, 1:5, 1:5] = 1
    out = BoundaryTargetTransform()(segmentation=seg.clone(), image=torch.randn(1, 6, 6, 6))
    assert out["segmentation"].shape == (2, 6, 6, 6) and out["segmentation"].dtype == torch.int16
    assert torch.equal(out["segmentation"][0], seg[0])
    assert out["segmentation"][1].sum() == 56


@pytest.mark.parametrize("dim", [2, 3])
def test_trainer_pipeline_computes_boundary_at_full_resolution_then_downsamples_like_seg(dim):
    from nnunet_plugins.trainers.banet import BANetTrainer

    patch = (8, 16, 16) if dim == 3 else (16, 16)
    ds_scales = [[1.0] * dim, [0.5] * dim, [0.25] * dim]
    pipeline = BANetTrainer.get_training_transforms(
        patch, rotation_for_DA=(0, 0), deep_supervision_scales=ds_scales, mirror_axes=tuple(range(dim)),
        do_dummy_2d_data_aug=False)
    kinds = [type(t) for t in pipeline.transforms]
    i = kinds.index(BoundaryTargetTransform)
    assert kinds[i + 1] is DownsampleSegForDSTransform  # right before the DS downsampling ...
    assert kinds.index(RemoveLabelTansform) < i  # ... after augmentation and the -1 -> 0 relabelling
    assert kinds.count(BoundaryTargetTransform) == 1
    val = BANetTrainer.get_validation_transforms(ds_scales)
    assert [type(t) for t in val.transforms][-2:] == [BoundaryTargetTransform, DownsampleSegForDSTransform]

    rng = np.random.default_rng(0)
    seg = np.zeros(patch, np.int16)
    seg[tuple(slice(2, p - 3) for p in patch)] = 1
    seg[tuple(slice(3, p - 5) for p in patch)] = 2
    image = torch.from_numpy(rng.normal(size=(1, *patch)).astype(np.float32))
    out = pipeline(image=image, segmentation=torch.from_numpy(seg)[None].clone())["segmentation"]
    assert len(out) == 3
    full = out[0]
    assert full.shape == (2, *patch)
    # whatever the random augmentation did, the boundary channel is the boundary of the augmented labels
    assert torch.equal(full[1], inner_boundary(full[0], dim).to(full.dtype))
    for scaled, s in zip(out[1:], ds_scales[1:]):
        expected = torch.nn.functional.interpolate(full[None].float(), [round(p * f) for p, f in zip(patch, s)],
                                                   mode="nearest-exact")[0].to(full.dtype)
        assert torch.equal(scaled, expected)


def test_regions_are_refused():
    from nnunet_plugins.trainers.banet import BANetTrainer

    with pytest.raises(ValueError, match="region"):
        BANetTrainer.get_validation_transforms(None, regions=[(1, 2), 2])
