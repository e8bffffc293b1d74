"""Boundary targets for BA-Net, computed inside nnU-Net v2's augmentation pipeline.

Definition (as the official BA-Net code makes them, ``utilities/boundary.py`` + ``BDRsampleTransform``):
for every label value ``l`` present in the patch except the largest, take the mask ``label > l``,
subtract its grey erosion with a 3x3x3 cube (2-D: 3x3 square; the erosion pads by reflection, so the patch
border is not marked), take the union over ``l`` and binarise. This marks a one-voxel inner contour of
every structure; at an interface between two classes only the voxels of the HIGHER label are marked.

Vectorised form used here (equivalent, no loop over labels or voxels): a voxel with label ``v`` is marked
iff the smallest label in its 3x3(x3) neighbourhood (edge-replicated) is smaller than ``v``. Proof: if a
neighbour has label ``m < v``, then ``m`` is present and not the largest, ``label > m`` holds at the voxel
but not at the neighbour, so the erosion removes the voxel. Conversely, if every neighbour is ``>= v``,
each mask ``label > l`` that contains the voxel (``l < v``) contains its whole neighbourhood. At the patch
border, reflection and edge replication of a one-voxel pad are the same.

``BoundaryTargetTransform`` computes this once on the augmented full-resolution patch and appends it as
an extra channel of ``segmentation``; it is inserted right before nnU-Net's ``DownsampleSegForDSTransform``,
which then downsamples the boundary exactly like the segmentation (nearest) to each deep-supervision
scale. nnU-Net's data loader only carries ``image`` and ``segmentation`` from the transforms to the batch,
so the boundary travels as the last segmentation channel and the trainer splits it off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import SegOnlyTransform


def inner_boundary(labels: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Boolean BA-Net boundary of a label map.

    labels: integer (or integral float) tensor ``(..., *spatial)`` with ``spatial_dims`` (2 or 3) trailing
    spatial axes; any leading axes (batch, channel) are independent maps. Returns a bool tensor of the
    same shape.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if labels.ndim < spatial_dims:
        raise ValueError(f"labels with shape {tuple(labels.shape)} have fewer than {spatial_dims} axes")
    spatial = labels.shape[labels.ndim - spatial_dims:]
    if labels.numel() == 0:
        return torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    x = labels.reshape(-1, 1, *spatial).float()  # label values are small integers: exact in float32
    x = F.pad(x, (1, 1) * spatial_dims, mode="replicate")
    pool = F.max_pool3d if spatial_dims == 3 else F.max_pool2d
    neighbourhood_min = -pool(-x, kernel_size=3, stride=1)
    return (neighbourhood_min < x[(slice(None), slice(None)) + (slice(1, -1),) * spatial_dims]).reshape(labels.shape)


def boundary_target(labels: torch.Tensor, spatial_dims: int, ignore_label: int | None = None,
                    ignore_value: int = 2) -> torch.Tensor:
    """Boundary target as int16 (0 = no boundary, 1 = boundary, ``ignore_value`` where ``labels == ignore_label``).

    With nnU-Net's ignore label, the unannotated voxels carry no boundary information either: they get
    ``ignore_value`` so that the boundary loss can skip them (the official code has no ignore label).
    """
    target = inner_boundary(labels, spatial_dims).to(torch.int16)
    if ignore_label is not None:
        target[labels == ignore_label] = ignore_value
    return target


class BoundaryTargetTransform(SegOnlyTransform):
    """Append the BA-Net boundary of segmentation channel ``channel`` as a new last channel.

    Input ``segmentation``: ``(C, *spatial)`` (one sample, as batchgeneratorsv2 transforms see it).
    Output: ``(C + 1, *spatial)`` with the same dtype; the last channel is ``boundary_target(...)``.
    """

    def __init__(self, channel: int = 0, ignore_label: int | None = None, ignore_value: int = 2):
        super().__init__()
        self.channel = channel
        self.ignore_label = ignore_label
        self.ignore_value = ignore_value

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        if isinstance(segmentation, (list, tuple)):
            raise RuntimeError("BoundaryTargetTransform must run before the deep-supervision downsampling "
                               "(it got a list of segmentations)")
        spatial_dims = segmentation.ndim - 1
        labels = segmentation[self.channel:self.channel + 1]
        bdr = boundary_target(labels, spatial_dims, self.ignore_label, self.ignore_value)
        return torch.cat((segmentation, bdr.to(segmentation.dtype)), 0)
