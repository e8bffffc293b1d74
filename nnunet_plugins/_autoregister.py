"""Make nnU-Net find this package's trainers.

nnU-Net 2.8 looks for trainers outside its own package only in the folders listed in the
``nnUNet_extTrainer`` environment variable, importing every module there as a top-level name.
Pointing it at ``nnunet_plugins/trainers`` itself would import our modules a second time under
other names (breaking class identity, pickling and relative imports), so we point it at
``nnunet_ext_trainers/``: a folder of one shim module that imports our trainers by their absolute
names. Training and prediction therefore resolve to the very same class objects.

This module is imported at interpreter start-up by the ``.pth`` file that the wheel installs, so it
must stay import-light: only ``os``.
"""
import os

EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext_trainers")


def register(environ=os.environ) -> str:
    """Append our shim folder to ``nnUNet_extTrainer`` (idempotent) and return the new value."""
    current = environ.get("nnUNet_extTrainer", "")
    parts = [p for p in current.split(os.pathsep) if p.strip()]
    if not any(os.path.abspath(p) == EXT_TRAINER_DIR for p in parts):
        parts.append(EXT_TRAINER_DIR)
    environ["nnUNet_extTrainer"] = os.pathsep.join(parts)
    return environ["nnUNet_extTrainer"]


if os.environ.get("NNUNET_PLUGINS_NO_AUTOREGISTER", "0") not in ("1", "true", "True"):
    register()
