"""Official checkpoints of the methods that released weights -> our networks and nnU-Net model folders.

One module per method maps the official state-dict names onto ours (``convert_state_dict(official,
network)``, strict: :class:`~nnunet_plugins.checkpoints.common.CheckpointMismatch` names every missing,
extra or mis-shaped tensor): ``banet`` (nnU-Net v1 ``generic_BANetV2``), ``cotr`` (``ResTranUnet``),
``uniseg`` (``UniSeg_model``; also the UniSeg backbone for fine-tuning), ``dodnet`` (``unet3D`` DynConv),
``transdodnet`` (``TransDoDNet``). Shared: ``common`` (reading, unwrapping, the strict match),
``nnunet_v1`` (nnU-Net v1 Generic_UNet names), ``model_folder`` (a converted checkpoint -> a complete
nnU-Net model folder; ``nnunet-plugins convert-checkpoint``).

Importing this package imports nothing heavy.
"""

#: method -> nnU-Net trainer of its model folders (``nnunet-plugins convert-checkpoint METHOD``)
TRAINERS = {"banet": "BANetTrainer", "cotr": "CoTrTrainer", "uniseg": "UniSegTrainer", "dodnet": "DoDNetTrainer",
            "transdodnet": "TransDoDNetTrainer"}
#: methods whose model folders are multi-task (predicted with ``nnunet-plugins predict-multitask``)
MULTITASK = ("uniseg", "dodnet", "transdodnet")
