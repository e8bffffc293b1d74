import pytest


@pytest.fixture
def nnunet_env(tmp_path):
    """Environment for running nnU-Net's commands in an isolated tree under tmp_path.

    See ``nnunet_plugins.runner.nnunet_cpu_env`` (folders, 2-core CPU settings, trainers registered).
    """
    from nnunet_plugins.runner import nnunet_cpu_env

    return nnunet_cpu_env(tmp_path)
