"""What the package provides, described as data (one table, as timm's model registry).

Each ``Method`` names its paper and the dotted paths of the trainers, networks and planners that make
it. Nothing here imports torch or nnU-Net; ``resolve`` imports an entry on demand. A new method is a
new row here plus its modules; ``nnunet-plugins list`` prints this table and the tests check that
every path resolves and every trainer is visible to nnU-Net's trainer discovery.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    paper: str
    summary: str
    trainers: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    planners: tuple[str, ...] = ()
    dimensions: tuple[str, ...] = ("3d",)
    extras: dict = field(default_factory=dict)
    #: ``nnUNetv2_train -tr`` can train the trainers on a dataset by itself; False for trainers that train one
    #: step of a pipeline run by the package's own command (MedSeqFT's stages need the previous model), which
    #: the harnesses that train every trainer (device check, DDP, benchmarks) leave out
    standalone: bool = True


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


register(Method(
    name="CoTr",
    paper="Xie, Zhang, Shen, Xia. CoTr: Efficiently Bridging CNN and Transformer for 3D Medical Image "
          "Segmentation. MICCAI 2021",
    summary="CNN encoder + deformable transformer (DeTrans) over two feature levels + additive-skip decoder",
    trainers=("nnunet_plugins.trainers.cotr.CoTrTrainer",),
    networks=("nnunet_plugins.architectures.cotr.CoTr",),
    planners=("nnunet_plugins.planners.cotr.CoTrPlanner",),
    dimensions=("3d",),
))

register(Method(
    name="UniSeg",
    paper="Ye, Xie, Zhang, Chen, Xia. UniSeg: A Prompt-driven Universal Segmentation Model as well as A Strong "
          "Representation Learner. MICCAI 2023",
    summary="nnU-Net U-Net + learnable universal prompt fused with the bottleneck into a task-specific prompt at the "
            "decoder input; one model for many partially labelled tasks (combine datasets with "
            "`nnunet-plugins combine`, predict with `nnunet-plugins predict-multitask`)",
    trainers=("nnunet_plugins.trainers.uniseg.UniSegTrainer",),
    networks=("nnunet_plugins.architectures.uniseg.UniSeg",),
    dimensions=("2d", "3d"),
))


register(Method(
    name="DoDNet",
    paper="Zhang, Xie, Xia, Shen. DoDNet: Learning to segment multi-organ and tumors from multiple partially "
          "labeled datasets. CVPR 2021",
    summary="residual 3-D U-Net whose dynamic head (three 1x1x1 convs) is generated per sample from the pooled "
            "bottleneck and the one-hot task; per-task binary sigmoid channels, partial-label Dice+BCE (combine "
            "datasets with `nnunet-plugins combine`, predict with `nnunet-plugins predict-multitask`). The paper "
            "is 3-D; the network and trainer also build a 2-D configuration (nn.Conv2d)",
    trainers=("nnunet_plugins.trainers.dodnet.DoDNetTrainer",),
    networks=("nnunet_plugins.architectures.dodnet.DoDNet",),
    dimensions=("2d", "3d"),
))

register(Method(
    name="TransDoDNet",
    paper="Xie, Zhang, Xia, Shen et al. Learning from partially labeled data for multi-organ and tumor "
          "segmentation. IEEE TPAMI 2023",
    summary="3-D ResNet-50 + deformable transformer with one query per task; each task query generates its "
            "dynamic head; per-task binary sigmoid channels, partial-label Dice+BCE, AdamW with warm-up "
            "(combine datasets with `nnunet-plugins combine`, predict with `nnunet-plugins predict-multitask`)",
    trainers=("nnunet_plugins.trainers.transdodnet.TransDoDNetTrainer",),
    networks=("nnunet_plugins.architectures.transdodnet.TransDoDNet",),
    dimensions=("3d",),
))


register(Method(
    name="BA-Net",
    paper="Hu, Liao, Ye, Xia. Boundary-Aware Network for Kidney Parsing. KiPA 2022 (LNCS 13648); Hu, Liao, Xia. "
          "Boundary-Aware Network for Abdominal Multi-Organ Segmentation. AMOS 2022 (arXiv:2208.13774)",
    summary="shared encoder + boundary decoder whose boundary maps gate the segmentation decoder's upsampled "
            "features; deep-supervised Dice+CE on segmentation and boundary",
    trainers=("nnunet_plugins.trainers.banet.BANetTrainer", "nnunet_plugins.trainers.banet.BANetTrainer_consistency"),
    networks=("nnunet_plugins.architectures.banet.BANetPlainConvUNet",
              "nnunet_plugins.architectures.banet.BANetResidualEncoderUNet"),
    dimensions=("2d", "3d"),
))

register(Method(
    name="LeFeD",
    paper="Zeng, Xie, Lu et al. Discrepancy Matters: Learning from Inconsistent Decoder Features for Consistent "
          "Semi-supervised Medical Image Segmentation. IEEE TMI 2025",
    summary="semi-supervised (imagesUn, `nnunet-plugins semi split/preprocess`): shared encoder + two different "
            "decoders (transposed conv / interpolation + conv, the second gated by the first); their feature "
            "discrepancy is fed back into the encoder over K=3 forward/backward passes per batch; inference = "
            "encoder + decoder 1 (the plans' U-Net; plans naming nnunet_plugins.architectures.lefed.LeFeDVNet build "
            "the official V-Net)",
    trainers=("nnunet_plugins.trainers.lefed.LeFeDTrainer",),
    networks=("nnunet_plugins.architectures.lefed.LeFeDUNet",),
    dimensions=("2d", "3d"),
))

register(Method(
    name="VerSemi",
    paper="Zeng, Xie, Lu et al. Segment Together: A Versatile Paradigm for Semi-Supervised Medical Image "
          "Segmentation. IEEE TMI 2025",
    summary="semi-supervised AND multi-task: the plans' U-Net + a controller (GAP(bottleneck) ++ one-hot task) "
            "generating a dynamic head, T dataset tasks + a synthetic CutMix task segmenting the union of "
            "foregrounds; stage 1 labeled, stage 2 unlabeled-labeled mixes and consistency with max over task "
            "prompts (combine sources with imagesUn via `nnunet-plugins combine`, `semi preprocess`, "
            "`semi split --per-task`; predict with `nnunet-plugins predict-multitask`). VerSemiVNet: the official "
            "V-Net variant (9,484,144 parameters)",
    trainers=("nnunet_plugins.trainers.versemi.VerSemiTrainer",
              "nnunet_plugins.trainers.versemi.VerSemiTrainer_stage1only"),
    networks=("nnunet_plugins.architectures.versemi.VerSemiUNet",),
    dimensions=("2d", "3d"),
    # the paper's V-Net (not built from nnU-Net plans; the trainers train VerSemiUNet)
    extras={"official_network": "nnunet_plugins.architectures.versemi.VerSemiVNet"},
))


register(Method(
    name="MedSeqFT",
    paper="Ye, Wu, Luo et al. MedSeqFT: Sequential Fine-tuning Foundation Models for 3D Medical Image Segmentation. "
          "2025 (no official code)",
    summary="sequential fine-tuning of a pre-trained U-Net (masked-volume pre-training) over a stream of datasets: "
            "MDS buffers, full fine-tuning teacher, LoRA student distilled from the teacher and from the previous "
            "model on the buffers, merged; one head per task (`nnunet-plugins medseqft pretrain|run|predict`)",
    trainers=("nnunet_plugins.trainers.medseqft.MedSeqFTTrainer", "nnunet_plugins.trainers.medseqft.MedSeqFTTeacherTrainer",
              "nnunet_plugins.trainers.medseqft.SequentialFTTrainer"),
    networks=("nnunet_plugins.architectures.medseqft.MedSeqFTNetwork",),
    dimensions=("3d",),
    standalone=False,
))


def resolve(dotted: str):
    """Import ``package.module.Name`` and return ``Name``."""
    module_name, _, attribute = dotted.rpartition(".")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError as e:
        raise ImportError(f"{module_name} has no attribute {attribute!r} (registry entry {dotted})") from e


def all_trainer_paths() -> list[str]:
    return [t for m in METHODS.values() for t in m.trainers]


def standalone_trainer_paths() -> list[str]:
    """The trainers ``nnUNetv2_train`` trains by itself (see ``Method.standalone``)."""
    return [t for m in METHODS.values() if m.standalone for t in m.trainers]


def find_method(name: str) -> Method:
    for key, method in METHODS.items():
        if key.lower() == name.lower():
            return method
    raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
