"""Official BA-Net checkpoints (nnU-Net v1 ``.model`` files) -> our ``BANetPlainConvUNet`` state dict.

The official checkpoints (Zenodo 7030423 KiPA22, 7030453 AMOS22) are ``torch.save`` dicts with
``state_dict`` (plus ``epoch``, ``optimizer_state_dict``, ``plot_stuff``, ...) of the official
``generic_BANetV2`` network: nnU-Net v1's ``Generic_UNet`` with strided-conv pooling, transposed-conv
upsampling, instance norm, LeakyReLU(0.01), and a second (boundary) decoder. Its parameter names:

=================================================  ============================================
official (v1)                                      ours (``BANetPlainConvUNet``, v1 layout)
=================================================  ============================================
conv_blocks_context.{d}.blocks.{i}.conv / instnorm  encoder.stages.{d}.0.convs.{i}.conv / norm
conv_blocks_context.{last}.0.blocks.{i}             encoder.stages.{last}.0.convs.{i}
conv_blocks_context.{last}.1.blocks.0               encoder.stages.{last}.0.convs.{n-1}
conv_blocks_localization.{u}.0.blocks.{i}, .1...    decoder.stages.{u}.convs.{i}
conv_blocks_boundary.{u}...                         boundary_decoder.stages.{u}.convs.{i}
tu.{u} / tb.{u}                                     decoder.transpconvs.{u} / boundary_decoder.transpconvs.{u}
seg_outputs.{u} / bdr_outputs.{u}                   decoder.seg_layers.{u} / boundary_decoder.seg_layers.{u}
=================================================  ============================================

``u`` counts decoder stages from the bottleneck in both. The architecture (stages, features, kernels,
strides, convolutions per stage, classes, input channels, 2-D/3-D) is read from the checkpoint's tensor
shapes, and the network is built with ``official_v1_layout=True`` (nnU-Net v1's decoder kernels, no bias
in transposed and output convolutions; the network's default, written explicitly into the architecture
entry so the converted file does not depend on that default), so every tensor must match in name AND
shape: anything left over on either side is an error that names the tensors.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict

import torch

from nnunet_plugins.atomic import torch_save
from nnunet_plugins.architectures.banet import BANET_PLAIN

_CONTEXT = re.compile(r"^conv_blocks_context\.(\d+)\.(?:(\d+)\.)?blocks\.(\d+)\.(conv|instnorm)\.(weight|bias)$")
_DECODER = re.compile(r"^(conv_blocks_localization|conv_blocks_boundary)\.(\d+)\.(\d+)\.blocks\.(\d+)\.(conv|instnorm)\."
                      r"(weight|bias)$")
_SINGLE = re.compile(r"^(tu|tb|seg_outputs|bdr_outputs)\.(\d+)\.(weight|bias)$")
_OUR_DECODER = {"conv_blocks_localization": "decoder", "conv_blocks_boundary": "boundary_decoder",
                "tu": "decoder.transpconvs", "tb": "boundary_decoder.transpconvs",
                "seg_outputs": "decoder.seg_layers", "bdr_outputs": "boundary_decoder.seg_layers"}
_LAYER = {"conv": "conv", "instnorm": "norm"}


class CheckpointMismatch(ValueError):
    """The official checkpoint does not fit the network (names or shapes)."""


def load_official_checkpoint(path: str, allow_pickle: bool = False) -> dict:
    """The ``state_dict`` of an official (nnU-Net v1) checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        import numpy as np

        # v1 checkpoints hold numpy scalars in their training curves; allow those without full unpickling
        safe = [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), np.float64, np.float32]
        try:
            from numpy._core.multiarray import scalar
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import scalar
        safe.append(scalar)
        with torch.serialization.safe_globals(safe):
            checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # unpickling errors come in several types
        if allow_pickle:
            raise ValueError(f"{path}: cannot read the checkpoint: {e}") from e
        raise ValueError(f"{path}: cannot be read as weights only ({type(e).__name__}: {str(e)[:300]}). If you "
                         f"trust this file, rerun with --allow-pickle") from e
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
    elif isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = checkpoint  # a bare state dict
    else:
        keys = list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: expected an nnU-Net v1 checkpoint with a 'state_dict' entry, found {keys}")
    # DataParallel / DDP checkpoints prefix 'module.'
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _shape(state: dict, key: str) -> tuple:
    if key not in state:
        raise CheckpointMismatch(f"official checkpoint lacks {key!r}; is this a BA-Net (generic_BANetV2) checkpoint?")
    return tuple(state[key].shape)


def infer_official_architecture(state: dict) -> dict:
    """``BANetPlainConvUNet`` constructor arguments (except ops) that reproduce the official network."""
    num_pool = len({int(m.group(2)) for k in state if (m := _SINGLE.match(k)) and m.group(1) == "tu"})
    if num_pool == 0 or not any(k.startswith("conv_blocks_boundary.") for k in state):
        raise CheckpointMismatch("not an official BA-Net checkpoint: no 'tu.*' transposed convolutions or no "
                                 "'conv_blocks_boundary.*' boundary decoder in its state_dict")
    blocks = defaultdict(int)  # (stage, part) -> number of conv blocks
    for k in state:
        if (m := _CONTEXT.match(k)) and m.group(4) == "conv" and m.group(5) == "weight":
            blocks[(int(m.group(1)), m.group(2))] += 1
    features, kernels, n_conv = [], [], []
    for d in range(num_pool + 1):
        if d < num_pool:
            first, parts = f"conv_blocks_context.{d}.blocks.0.conv.weight", [(d, None)]
        else:  # the bottleneck is a Sequential of two StackedConvLayers
            first, parts = f"conv_blocks_context.{d}.0.blocks.0.conv.weight", [(d, "0"), (d, "1")]
        shape = _shape(state, first)
        if d == 0:
            input_channels = shape[1]
        features.append(shape[0])
        kernels.append(list(shape[2:]))
        n_conv.append(sum(blocks[p] for p in parts))
    dim = len(kernels[0])
    strides = [[1] * dim]
    for d in range(1, num_pool + 1):
        strides.append(list(_shape(state, f"tu.{num_pool - d}.weight")[2:]))  # tu.{u} undoes pool -(u+1)
    n_conv_decoder = []
    for u in range(num_pool):
        n = sum(1 for k in state if re.match(rf"^conv_blocks_localization\.{u}\.\d+\.blocks\.\d+\.conv\.weight$", k))
        n_conv_decoder.append(n)
    num_classes = _shape(state, "seg_outputs.0.weight")[0]
    conv_bias = "conv_blocks_context.0.blocks.0.conv.bias" in state
    batch_norm = any(k.endswith("running_mean") for k in state)
    return dict(input_channels=input_channels, n_stages=num_pool + 1, features_per_stage=features, dim=dim,
                kernel_sizes=kernels, strides=strides, n_conv_per_stage=n_conv, num_classes=num_classes,
                n_conv_per_stage_decoder=n_conv_decoder, conv_bias=conv_bias, batch_norm=batch_norm)


def plans_architecture(arch: dict) -> dict:
    """The architecture entry of an nnU-Net v2 plans configuration for ``arch`` (string ops, v1 layout)."""
    dim = arch["dim"]
    norm = (f"torch.nn.modules.batchnorm.BatchNorm{dim}d" if arch["batch_norm"]
            else f"torch.nn.modules.instancenorm.InstanceNorm{dim}d")
    kwargs = {k: arch[k] for k in ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
                                   "n_conv_per_stage_decoder", "conv_bias")}
    kwargs.update(conv_op=f"torch.nn.modules.conv.Conv{dim}d", norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                  nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"negative_slope": 1e-2, "inplace": True},
                  official_v1_layout=True)
    return {"network_class_name": BANET_PLAIN, "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def build_network(architecture: dict, input_channels: int, num_classes: int) -> torch.nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], input_channels, num_classes,
                                  allow_init=False, deep_supervision=True)


def official_to_ours_name(key: str) -> str | None:
    """Our parameter name for an official one (None if the name is not a BA-Net parameter)."""
    if m := _CONTEXT.match(key):
        stage, part, block, layer, what = m.groups()
        if part == "1":  # bottleneck's second StackedConvLayers: its block follows those of part 0
            return f"encoder.stages.{stage}.0.convs.@{block}.{_LAYER[layer]}.{what}"
        return f"encoder.stages.{stage}.0.convs.{block}.{_LAYER[layer]}.{what}"
    if m := _DECODER.match(key):
        which, stage, part, block, layer, what = m.groups()
        prefix = f"{_OUR_DECODER[which]}.stages.{stage}.convs"
        return f"{prefix}.@{block}.{_LAYER[layer]}.{what}" if part == "1" else \
            f"{prefix}.{block}.{_LAYER[layer]}.{what}"
    if m := _SINGLE.match(key):
        which, index, what = m.groups()
        return f"{_OUR_DECODER[which]}.{index}.{what}"
    return None


def convert_state_dict(official: dict, network: torch.nn.Module) -> dict:
    """Map ``official`` onto ``network``'s state dict; raise ``CheckpointMismatch`` naming what does not fit."""
    # blocks of the second StackedConvLayers ('@i') follow those of the first part of the same stage
    first_part_blocks = defaultdict(int)
    renamed = {}
    for key in official:
        name = official_to_ours_name(key)
        if name is not None and "@" not in name and ".convs." in name and name.endswith(".conv.weight"):
            first_part_blocks[name.split(".convs.")[0]] += 1
    unknown = []
    for key, value in official.items():
        name = official_to_ours_name(key)
        if name is None:
            unknown.append(key)
            continue
        if "@" in name:
            head, tail = name.split(".convs.@")
            block, rest = tail.split(".", 1)
            name = f"{head}.convs.{first_part_blocks[head] + int(block)}.{rest}"
        renamed[name] = value

    ours = network.state_dict()
    # our blocks register each layer twice (conv and all_modules.k; decoder.encoder aliases the encoder):
    # fill every alias of a parameter from its canonical name
    aliases = defaultdict(list)
    for name, tensor in list(network.named_parameters(remove_duplicate=False)) + \
            list(network.named_buffers(remove_duplicate=False)):
        aliases[id(tensor)].append(name)
    result, missing, wrong_shape = {}, [], []
    used = set()
    for names in aliases.values():
        names = [n for n in names if n in ours]
        if not names:
            continue
        source = next((n for n in names if n in renamed), None)
        if source is None:
            missing.append(min(names, key=len))  # the canonical name (not an all_modules / decoder.encoder alias)
            continue
        used.add(source)
        if tuple(renamed[source].shape) != tuple(ours[source].shape):
            wrong_shape.append(f"{source}: official {tuple(renamed[source].shape)} vs ours {tuple(ours[source].shape)}")
            continue
        for n in names:
            if n in ours:
                result[n] = renamed[source].to(ours[n].dtype)
    leftover = sorted(set(renamed) - used) + unknown
    problems = []
    if wrong_shape:
        problems.append("shape mismatches: " + "; ".join(wrong_shape[:10]) + (" ..." if len(wrong_shape) > 10 else ""))
    if missing:
        missing = sorted(set(missing))
        problems.append(f"{len(missing)} parameters of our network have no official counterpart: "
                        + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    if leftover:
        problems.append(f"{len(leftover)} official tensors have no place in our network: " + ", ".join(leftover[:10])
                        + (" ..." if len(leftover) > 10 else ""))
    if problems:
        raise CheckpointMismatch("the official checkpoint does not match the BA-Net network: " + " | ".join(problems))
    not_filled = sorted(set(ours) - set(result))
    if not_filled:
        raise CheckpointMismatch("internal: network tensors not filled: " + ", ".join(not_filled[:10]))
    return result


def convert_official_checkpoint(path: str, output: str, allow_pickle: bool = False,
                                expected_architecture: dict | None = None) -> dict:
    """Convert an official BA-Net checkpoint; write ``output`` (atomically) and return its content.

    The output is a torch file ``{'network_weights', 'architecture', 'input_channels', 'num_classes',
    'source'}``: ``architecture`` is an nnU-Net v2 plans architecture entry (BANetPlainConvUNet,
    official_v1_layout) and ``network_weights`` loads strictly into the network it builds. With
    ``expected_architecture`` (e.g. from a plans file) the shapes must also fit that architecture.
    """
    official = load_official_checkpoint(path, allow_pickle)
    arch = infer_official_architecture(official)
    architecture = plans_architecture(arch)
    network = build_network(expected_architecture or architecture, arch["input_channels"], arch["num_classes"])
    weights = convert_state_dict(official, network)
    network.load_state_dict(weights, strict=True)  # the final proof: every tensor in place
    content = {"network_weights": weights, "architecture": expected_architecture or architecture,
               "input_channels": arch["input_channels"], "num_classes": arch["num_classes"],
               "source": os.path.abspath(path)}
    torch_save(content, output)
    return content
