"""Official BA-Net checkpoints (nnU-Net v1 ``.model`` files) -> our ``BANetPlainConvUNet`` state dict.

The official checkpoints (Zenodo 7030423 KiPA22, 7030453 AMOS22) are ``torch.save`` dicts with
``state_dict`` (plus ``epoch``, ``optimizer_state_dict``, ``plot_stuff``, ...) of the official
``generic_BANetV2`` network: nnU-Net v1's ``Generic_UNet`` with strided-conv pooling, transposed-conv
upsampling, instance norm, LeakyReLU(0.01), and a second (boundary) decoder. Its parameter names are
nnU-Net v1's (:mod:`nnunet_plugins.checkpoints.nnunet_v1`) plus the boundary decoder:
``conv_blocks_boundary.{u}`` / ``tb.{u}`` / ``bdr_outputs.{u}`` -> ``boundary_decoder.stages.{u}`` /
``boundary_decoder.transpconvs.{u}`` / ``boundary_decoder.seg_layers.{u}``.

The architecture (stages, features, kernels,
strides, convolutions per stage, classes, input channels, 2-D/3-D) is read from the checkpoint's tensor
shapes, and the network is built with ``official_v1_layout=True`` (nnU-Net v1's decoder kernels, no bias
in transposed and output convolutions; the network's default, written explicitly into the architecture
entry so the converted file does not depend on that default), so every tensor must match in name AND
shape: anything left over on either side is an error that names the tensors.
"""
from __future__ import annotations

import os

import torch

from nnunet_plugins.architectures.banet import BANET_PLAIN
from nnunet_plugins.atomic import torch_save
from nnunet_plugins.checkpoints.common import (  # noqa: F401  (CheckpointMismatch: part of this module's API)
    CheckpointMismatch, convert_with, read_checkpoint, unwrap_state_dict,
)
from nnunet_plugins.checkpoints.nnunet_v1 import (
    REQUIRES_IMPORT, UNET_SINGLES, UNET_STAGES, V1UNetNames, infer_v1_unet, plans_ops,
)

WHAT = "an official BA-Net (generic_BANetV2) checkpoint"
#: v1 module lists of BA-Net -> ours: the plain U-Net's plus the boundary decoder
STAGES = {**UNET_STAGES, "conv_blocks_boundary": "boundary_decoder.stages.{s}"}
SINGLES = {**UNET_SINGLES, "tb": "boundary_decoder.transpconvs", "bdr_outputs": "boundary_decoder.seg_layers"}


def load_official_checkpoint(path: str, allow_pickle: bool = False) -> dict:
    """The state dict of an official (nnU-Net v1) checkpoint file ('module.' prefixes removed)."""
    return unwrap_state_dict(read_checkpoint(path, allow_pickle), path)


def infer_official_architecture(state: dict) -> dict:
    """``BANetPlainConvUNet`` constructor arguments (except ops) that reproduce the official network."""
    if not any(k.startswith("conv_blocks_boundary.") for k in state) or not any(k.startswith("tu.") for k in state):
        raise CheckpointMismatch("not an official BA-Net checkpoint: no 'tu.*' transposed convolutions or no "
                                 "'conv_blocks_boundary.*' boundary decoder in its state_dict")
    return infer_v1_unet(state, WHAT)


def plans_architecture(arch: dict) -> dict:
    """The architecture entry of an nnU-Net v2 plans configuration for ``arch`` (string ops, v1 layout)."""
    kwargs = {k: arch[k] for k in ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
                                   "n_conv_per_stage_decoder", "conv_bias")}
    kwargs.update(plans_ops(arch["dim"], arch["batch_norm"]), official_v1_layout=True)
    return {"network_class_name": BANET_PLAIN, "arch_kwargs": kwargs, "_kw_requires_import": list(REQUIRES_IMPORT)}


def build_network(architecture: dict, input_channels: int, num_classes: int) -> torch.nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], input_channels, num_classes,
                                  allow_init=False, deep_supervision=True)


def convert_state_dict(official: dict, network: torch.nn.Module) -> dict:
    """Map ``official`` onto ``network``'s state dict; raise ``CheckpointMismatch`` naming what does not fit."""
    return convert_with(official, V1UNetNames(official, STAGES, SINGLES), network, "BA-Net")


def convert_official_checkpoint(path: str, output: str, allow_pickle: bool = False,
                                expected_architecture: dict | None = None) -> dict:
    """Convert an official BA-Net checkpoint; write ``output`` (atomically) and return its content.

    The output is a torch file ``{'network_weights', 'architecture', 'input_channels', 'num_classes',
    'source'}``: ``architecture`` is an nnU-Net v2 plans architecture entry (BANetPlainConvUNet,
    official_v1_layout) and ``network_weights`` loads strictly into the network it builds. With
    ``expected_architecture`` (e.g. from a plans file) the shapes must also fit that architecture.
    (``nnunet-plugins convert-checkpoint banet`` writes a complete nnU-Net model folder instead.)
    """
    official = load_official_checkpoint(path, allow_pickle)
    arch = infer_official_architecture(official)
    architecture = expected_architecture or plans_architecture(arch)
    network = build_network(architecture, arch["input_channels"], arch["num_classes"])
    weights = convert_state_dict(official, network)
    network.load_state_dict(weights, strict=True)  # the final proof: every tensor in place
    content = {"network_weights": weights, "architecture": architecture,
               "input_channels": arch["input_channels"], "num_classes": arch["num_classes"],
               "source": os.path.abspath(path)}
    torch_save(content, output)
    return content
