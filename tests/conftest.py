import os

import pytest


@pytest.fixture
def nnunet_env(tmp_path):
    """Environment for running nnU-Net's commands in an isolated tree under tmp_path.

    Sets nnUNet_raw / nnUNet_preprocessed / nnUNet_results, the 2-core settings that keep CPU runs
    fast and small (no data-augmentation worker processes, 2 planning processes, no torch.compile)
    and registers this package's trainers (idempotent; the installed .pth does the same).
    """
    from nnunet_plugins._autoregister import register

    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(tmp_path / name)
        os.makedirs(env[name], exist_ok=True)
    env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="2", nnUNet_compile="0", OMP_NUM_THREADS="2")
    register(env)
    return env
