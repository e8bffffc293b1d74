"""nnU-Net trainers of this package. Everything exported here is visible to ``nnUNetv2_train -tr``."""
from nnunet_plugins.trainers.base import PluginTrainer  # noqa: F401

__all__ = ["PluginTrainer"]
