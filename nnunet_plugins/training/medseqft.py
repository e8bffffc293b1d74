"""MedSeqFT: design note and options (the trainer and ``nnunet-plugins medseqft`` are built on this).

Paper: Y. Ye, Y. Wu, X. Luo et al. "MedSeqFT: Sequential Fine-tuning Foundation Models for 3D Medical
Image Segmentation", 2025. No official code; the paper does not publish K, R, the LoRA rank, the loss
weights or the distillation form. This module records the procedure as implemented here, the defaults
we chose and why, and which building blocks each step calls.

Implemented by :mod:`nnunet_plugins.trainers.medseqft` (trainers, reconstruction training) and
``nnunet-plugins medseqft`` (:mod:`nnunet_plugins.commands.medseqft`: datasets, stages, records, prediction).

Procedure
---------
Given M_0 (a U-Net of M_0's plans with a masked-reconstruction head) and datasets D_1..D_n, all
preprocessed with M_0's plans (one architecture across the sequence; same input channels), stage t:

0. **MDS buffer B_t** (needs only M_0, so it may run before the stage's training and is cached):
   :func:`~nnunet_plugins.training.mds.mds_scores` of M_0 (``ReconstructionNetwork(M_0, head)``) over the
   training cases of D_t (:func:`~nnunet_plugins.training.mds.preprocessed_images`, the fold's training
   ids), ``R`` masks each; :func:`~nnunet_plugins.training.mds.buffer_record` keeps the ``K`` lowest;
   :func:`~nnunet_plugins.training.mds.write_buffer` stores it (atomic JSON, case ids + all scores). A
   buffer holds case IDS: the later stages read those cases from D_j's preprocessed folder.
1. **Teacher T_t**: full fine-tuning of a copy of M_{t-1} on D_t with nnU-Net's loss and schedule; a
   new segmentation head for task t (one head per task; old heads untouched and unused here).
2. **Student** = M_{t-1} (every parameter frozen) + :func:`~nnunet_plugins.architectures.blocks.lora.add_lora`
   of rank ``r`` on its Conv2d/Conv3d/Linear layers, EXCLUDING the new task-t head, which is copied from
   T_t and trained fully (it is new, M_{t-1} has nothing to retain there; a 1x1 conv is tiny). Optimiser: AdamW
   at 5e-3 with nnU-Net's poly schedule (``MedSeqFTTrainer.lora_lr``; nnU-Net's SGD barely moves the adapters).
   Transposed convolutions and norms stay frozen (see lora.py). The optimizer gets
   :func:`~nnunet_plugins.architectures.blocks.lora.lora_parameters` + the task-t head. Loss per
   iteration::

       L = L_seg(student_t(x), y)                          x, y: a D_t batch (nnU-Net's DC+CE, deep supervision)
         + lambda * KD(student_t(x), T_t(x))                teacher in eval mode, no grad
         + mu     * KD(student_{1..t-1}(b), M_{t-1}(b))     b: a batch of buffer cases of B_1..B_{t-1}

   KD = :func:`~nnunet_plugins.training.distillation.build_distillation_loss` (``kd``), given nnU-Net's
   deep-supervision weights so the logits are weighed like L_seg. On buffer batches the student and
   M_{t-1} are compared on EVERY old task head (M_{t-1} knows all of them), averaged over heads. For
   ``features_mse`` the features are the final decoder features, read with
   :func:`~nnunet_plugins.training.feature_capture.capture_inputs` on
   :func:`~nnunet_plugins.training.feature_capture.final_decoder_features_module` (one term for all heads,
   so on buffer batches no head is run). At stage 1 there is no buffer: mu's term is absent.
3. **Merge**: :func:`~nnunet_plugins.architectures.blocks.lora.merge_lora` folds the adapters into the
   weights (exact up to float rounding, tested) -> M_t: plain network, original state-dict names, heads
   1..t. Saved as a standard nnU-Net model folder; the stage is finished when its final checkpoint AND
   its buffer exist (both written atomically), which is what a rerun checks to skip it.

M_0 itself: pre-trained with :class:`~nnunet_plugins.training.masked_reconstruction.MaskedReconstruction`
on ``ReconstructionNetwork(unet)`` (labels unused) or, for ``--init`` checkpoints without a head, the
head alone trained briefly on the frozen network (``ReconstructionNetwork(unet, head)``, only
``head.parameters()`` in the optimizer) so that MDS scores mean something.

Defaults (:class:`MedSeqFTOptions`) and why
-------------------------------------------
* ``k = 10`` buffer cases per stage: the buffers only feed distillation (no labels), so a few cases
  per task suffice to anchor the old behaviour, while rehearsal work in continual segmentation keeps
  buffers of the order of 5-10 % of a dataset (nnU-Net datasets: 20-300 training cases); 10 is half of
  the smallest common dataset (MSD Heart, 20) and keeps later stages' buffer batches varied. ``k`` above
  a dataset's size keeps the whole dataset (:func:`~nnunet_plugins.training.mds.select_lowest`).
* ``repeats = 5`` (R): one mask's loss depends on which cubes it hides; the mean of R runs has
  1/sqrt(R) of that spread (R = 5: 45 %) at R inference passes per case, seconds per dataset on a GPU.
* ``rank = 8`` (r), ``lora_alpha = None`` (= r, scale 1): Hu et al. find ranks 4-8 enough. A 3x3x3
  conv's adapter A has ``in * 27 * r`` weights: r = 8 adds 2.6 % to a 320-channel conv and 3.1 % to the
  whole default 3d_fullres PlainConvUNet (970,536 trainable next to 31.2 M frozen; r = 4: 1.6 %, r = 16:
  6.2 %): capacity for a new task without rewriting M_{t-1}, still a small, cheaply merged update.
* ``lam = 1.0`` (lambda, KD to the teacher on D_t) and ``mu = 1.0`` (KD to M_{t-1} on the buffers):
  with the T^2-scaled KL the distillation gradients have the size of the segmentation loss's
  (Hinton et al.), so 1 weighs learning the new task (L_seg + teacher) and keeping the old ones
  (buffer) as equals; LoRA's low rank already limits drift, so the retention term need not dominate.
  The forgetting benchmark is where to tune them.
* ``kd = "kl"``, ``temperature = 2.0``: KL on softened probabilities transfers the teacher's voxel-wise
  uncertainty (boundaries), is invariant to per-voxel logit offsets that carry no information (logits
  MSE penalises them), and matches what the heads are trained for (softmax + CE). With the 2-3 classes of
  a segmentation task, T = 1 leaves most voxels one-hot and T >= 4 flattens them; 2 sits between.
* Reconstruction objective (``mask_ratio = 0.6``, ``cube_size = 16``, ``fill = "zero"``,
  ``recon_loss = "mse"``): see :mod:`~nnunet_plugins.training.masked_reconstruction`.
* ``mds_patches = "centre"``: one patch per case, see :mod:`~nnunet_plugins.training.mds`.
* ``seed = 0``: MDS masks (per case, see mds.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

from nnunet_plugins.training.distillation import KD_TYPES, build_distillation_loss
from nnunet_plugins.training.masked_reconstruction import MaskedReconstruction
from nnunet_plugins.training.mds import PATCH_MODES

__all__ = ["MedSeqFTOptions"]


@dataclass(frozen=True)
class MedSeqFTOptions:
    """MedSeqFT's options with the defaults argued in the module docstring; checked on construction.

    ``to_dict`` / ``from_dict`` round-trip through JSON (a sequence run stores them, and a rerun with
    other options is refused rather than mixing stages trained differently)."""
    k: int = 10
    repeats: int = 5
    rank: int = 8
    lora_alpha: float | None = None
    lam: float = 1.0
    mu: float = 1.0
    kd: str = "kl"
    temperature: float = 2.0
    mask_ratio: float = 0.6
    cube_size: int | float = 16
    fill: str = "zero"
    recon_loss: str = "mse"
    mds_patches: str = "centre"
    seed: int = 0

    def __post_init__(self):
        for name in ("k", "repeats", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MedSeqFT option {name} must be an int >= 1, got {v!r}")
        for name in ("lam", "mu"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MedSeqFT option {name} must be >= 0, got {getattr(self, name)!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"MedSeqFT option lora_alpha must be > 0, got {self.lora_alpha!r}")
        if self.kd not in KD_TYPES:
            raise ValueError(f"MedSeqFT option kd must be one of {', '.join(KD_TYPES)}, got {self.kd!r}")
        if self.mds_patches not in PATCH_MODES:
            raise ValueError(f"MedSeqFT option mds_patches must be one of {PATCH_MODES}, got {self.mds_patches!r}")
        self.objective()              # checks mask_ratio, fill, recon_loss
        self.kd_loss()                # checks temperature

    def objective(self) -> MaskedReconstruction:
        """The masked-reconstruction objective of pre-training and MDS."""
        return MaskedReconstruction(self.mask_ratio, self.cube_size, self.fill, self.recon_loss)

    def kd_loss(self, weights: Sequence[float] | None = None):
        """The KD term (``weights``: nnU-Net's deep-supervision weights for logits)."""
        return build_distillation_loss(self.kd, self.temperature, weights)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MedSeqFTOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MedSeqFT option(s) {unknown}")
        return cls(**d)
