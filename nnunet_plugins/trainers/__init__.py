"""nnU-Net trainers of this package. Everything exported here is visible to ``nnUNetv2_train -tr``."""
from nnunet_plugins.trainers.base import PluginTrainer
from nnunet_plugins.trainers.cotr import CoTrTrainer
from nnunet_plugins.trainers.multitask import MultiTaskTrainer
from nnunet_plugins.trainers.semi import LabeledOnlyTrainer, SemiSupervisedTrainer
from nnunet_plugins.trainers.uniseg import UniSegTrainer
from nnunet_plugins.trainers.banet import BANetTrainer, BANetTrainer_consistency
from nnunet_plugins.trainers.dodnet import DoDNetTrainer
from nnunet_plugins.trainers.transdodnet import TransDoDNetTrainer
from nnunet_plugins.trainers.lefed import LeFeDTrainer
from nnunet_plugins.trainers.versemi import VerSemiTrainer, VerSemiTrainer_stage1only
from nnunet_plugins.trainers.medseqft import MedSeqFTTeacherTrainer, MedSeqFTTrainer, SequentialFTTrainer

__all__ = ["PluginTrainer", "CoTrTrainer", "MultiTaskTrainer", "SemiSupervisedTrainer", "LabeledOnlyTrainer",
           "UniSegTrainer", "BANetTrainer", "BANetTrainer_consistency", "DoDNetTrainer", "TransDoDNetTrainer",
           "LeFeDTrainer", "VerSemiTrainer", "VerSemiTrainer_stage1only",
           "MedSeqFTTrainer", "MedSeqFTTeacherTrainer", "SequentialFTTrainer"]
