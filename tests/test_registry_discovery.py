"""The package's methods are listed, importable and found by nnU-Net's own trainer discovery."""
import json
import os
import subprocess
import sys

import pytest

import nnunet_plugins.trainers as trainers_pkg
from nnunet_plugins import _autoregister
from nnunet_plugins.registry import METHODS, all_trainer_paths, find_method, resolve


def test_every_registry_entry_resolves():
    for method in METHODS.values():
        for dotted in method.trainers + method.networks + method.planners:
            assert resolve(dotted) is not None, dotted


def test_every_registered_trainer_is_exported_for_discovery():
    exported = set(trainers_pkg.__all__)
    for dotted in all_trainer_paths():
        name = dotted.rpartition(".")[2]
        assert name in exported, f"{name} is registered but not exported by nnunet_plugins.trainers"
        assert getattr(trainers_pkg, name) is resolve(dotted)


def test_nnunet_finds_the_same_trainer_classes(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    monkeypatch.setenv("nnUNet_extTrainer", _autoregister.register({}))
    for dotted in all_trainer_paths():
        found = recursive_find_trainer_class_by_name(dotted.rpartition(".")[2])
        # identity, not just the name: train and predict must use our class, not a re-imported copy
        assert found is resolve(dotted)


def test_register_is_idempotent_and_keeps_user_folders(tmp_path):
    env = {"nnUNet_extTrainer": str(tmp_path)}
    value = _autoregister.register(env)
    assert value == os.pathsep.join([str(tmp_path), _autoregister.EXT_TRAINER_DIR])
    assert _autoregister.register(env) == value


def test_installed_pth_registers_trainers_at_startup():
    """A fresh interpreter (as nnUNetv2_train starts one) has our folder in nnUNet_extTrainer."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('nnUNet_extTrainer'))"],
                         env=env, capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == _autoregister.EXT_TRAINER_DIR


def test_cli_list_reports_every_method():
    out = subprocess.run([sys.executable, "-m", "nnunet_plugins", "list", "--json", "--check"],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    listed = json.loads(out.stdout)
    assert listed["failures"] == []
    assert [m["name"] for m in listed["methods"]] == list(METHODS)
    assert "CoTrTrainer" in listed["methods"][0]["trainers"]


def test_find_method_is_case_insensitive_and_errors_clearly():
    assert find_method("cotr").name == "CoTr"
    with pytest.raises(KeyError, match="unknown method"):
        find_method("NoSuchNet")


def test_registered_networks_are_the_ones_the_trainers_build():
    """The table cannot drift from the code: every trainer's network class (or, for a family such as BA-Net's,
    a member of it) is listed as one of its method's networks, and every listed network is built by one."""
    for method in METHODS.values():
        networks = [resolve(n) for n in method.networks]
        built = [resolve(t).network_class for t in method.trainers]
        assert all(any(issubclass(n, b) for n in networks) for b in built), method.name
        assert all(any(issubclass(n, b) for b in built) for n in networks), method.name
        for n in networks:
            assert n.network_name() == f"{n.__module__}.{n.__qualname__}" and n.network_name() in method.networks
