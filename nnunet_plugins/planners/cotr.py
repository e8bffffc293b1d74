"""Experiment planner for CoTr: a 3d_fullres configuration whose patch CoTr can process.

CoTr's CNN encoder has a fixed stem stride (1, 2, 2) and three stride-2 stages, and its decoder
adds skips without cropping, so every patch axis must be a multiple of the total stride (8, 16, 16).
The official code trains 48 x 192 x 192 patches with batch size 2 on BCV; this planner keeps that
voxel budget (scaled with the GPU memory target, 8 GB = the official budget), shapes the patch
isotropically in millimetres like nnU-Net does, caps it at the median image, and writes the CoTr
network into the plans (``architecture.network_class_name``) so the plans are self-describing.

It writes ``nnUNetPlans_CoTr.json`` (3d_fullres only; CoTr is 3-D only). nnU-Net's own CLI cannot
load planners from outside its package, so run it through ``nnunet-plugins plan -d ID -m CoTr``,
then ``nnUNetv2_preprocess -d ID -plans_name nnUNetPlans_CoTr -c 3d_fullres`` (or pass
``--preprocess``) and ``nnUNetv2_train ID 3d_fullres FOLD -tr CoTrTrainer -p nnUNetPlans_CoTr``.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_plugins.architectures.cotr import CoTr
from nnunet_plugins.planners.common import patch_for_voxel_budget

OFFICIAL_PATCH = (48, 192, 192)
OFFICIAL_BATCH_SIZE = 2


class CoTrPlanner(ExperimentPlanner):
    """nnU-Net planner writing a CoTr 3d_fullres configuration (see the module docstring).

    Attributes a caller may set before ``plan_experiment`` (the ``nnunet-plugins plan`` command does):
    ``patch_size_override`` (3 ints, rounded to the divisor), ``batch_size_override`` (int) and
    ``arch_kwargs_override`` (dict of CoTr constructor arguments, e.g. narrower stages for CPU runs).
    """

    default_plans_name = "nnUNetPlans_CoTr"

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetPlans_CoTr",
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        # CoTr has no low-resolution cascade: never search for a 3d_lowres configuration
        self.lowres_creation_threshold = 0.0
        self.patch_size_override = None
        self.batch_size_override = None
        self.arch_kwargs_override = {}

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if len(spacing) != 3:
            return plan  # the 2d configuration is dropped in save_plans
        # CoTr's divisor and its fitter (axes multiples of (8, 16, 16), more than one deepest voxel)
        if self.patch_size_override is not None:
            patch = CoTr.fit_patch(self.patch_size_override)
        else:
            budget = float(np.prod(OFFICIAL_PATCH)) * self.UNet_vram_target_GB / 8.0
            patch = CoTr.fit_patch(patch_for_voxel_budget(spacing, median_shape, budget, CoTr.divisor_for({}, 3)))
        plan["patch_size"] = tuple(patch)
        plan["batch_size"] = int(self.batch_size_override or OFFICIAL_BATCH_SIZE)
        # the U-Net's pooling is meaningless for CoTr; keep nnU-Net's keys consistent with CoTr's strides
        plan["architecture"] = {
            "network_class_name": CoTr.network_name(),
            "arch_kwargs": dict(self.arch_kwargs_override),
            "_kw_requires_import": [],
        }
        return plan

    def save_plans(self, plans):
        if "3d_fullres" not in plans["configurations"]:
            raise ValueError(f"{self.dataset_name} is a 2-D dataset; CoTr is a 3-D method and has no 2-D "
                             f"configuration")
        plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}
        super().save_plans(plans)
