"""Official checkpoint -> nnU-Net model folder, for every converter: plans, dataset.json, fingerprint and
fold checkpoint in nnU-Net 2.8's format, loaded by nnU-Net's own predictor (in-process here; the stock
commands run on such folders in tests/e2e/test_e2e_checkpoints.py)."""
import dataclasses
import json
import os

import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from multitask_helpers import toy_spec
from nnunet_plugins.architectures.dodnet import DoDNet
from nnunet_plugins.checkpoints.common import CheckpointMismatch
from nnunet_plugins.checkpoints.model_folder import write_model_folder
from nnunet_plugins.cli import main as cli_main
from nnunet_plugins.multitask.prediction import MultiTaskPredictor

import official_names as names
from checkpoint_helpers import TINY_DODNET, official_checkpoints, randomize, to_official

DATASET = "Dataset020_Ckpt"
# task A: 1 channel, background + 2 classes (2 binary channels); task B: 2 channels, background + 1 class
SPEC = toy_spec(channels=(1, 2), classes=(3, 2))
SPEC = dataclasses.replace(SPEC, tasks=tuple(dataclasses.replace(t, source_labels=dict(zip(t.label_names, t.label_values)))
                                             for t in SPEC.tasks))   # source labels: one binary channel per label
N_IN, N_LABELS = 2, 4                   # combined labels 0..3
PATCH = [16, 40, 40]                    # fits none of the networks: the writer rounds it
@pytest.fixture(scope="module")
def checkpoints():
    return official_checkpoints(N_IN, N_LABELS, uniseg_classes=3, num_tasks=2, binary_channels=2)


def make_dataset(root) -> str:
    pre = os.path.join(root, "nnUNet_preprocessed", DATASET)
    os.makedirs(pre)
    os.makedirs(os.path.join(root, "nnUNet_results"))
    plans = {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
             "original_median_spacing_after_transp": [2.0, 1.0, 1.0], "original_median_shape_after_transp": [16, 40, 40],
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "label_manager": "LabelManager",
             "experiment_planner_used": "ExperimentPlanner", "foreground_intensity_properties_per_channel": {},
             "configurations": {"3d_fullres": {
                 "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                 "batch_size": 2, "patch_size": PATCH, "median_image_size_in_voxels": [16, 40, 40],
                 "spacing": [2.0, 1.0, 1.0], "normalization_schemes": ["NoNormalization"] * 2,
                 "use_mask_for_norm": [False, False], "batch_dice": True,
                 "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                  "arch_kwargs": {}, "_kw_requires_import": []}},
                 "3d_lowres": {"inherits_from": "3d_fullres", "spacing": [4.0, 2.0, 2.0]}}}
    dataset_json = {"channel_names": {"0": "noNorm", "1": "noNorm"}, "labels": SPEC.combined_labels_dict(),
                    "numTraining": 4, "file_ending": ".nii.gz", "multitask": SPEC.to_json()}
    for name, obj in (("nnUNetPlans", plans), ("dataset", dataset_json), ("dataset_fingerprint", {"spacings": []})):
        with open(os.path.join(pre, name + ".json"), "w") as f:
            json.dump(obj, f)
    return pre


@pytest.fixture
def env(tmp_path, monkeypatch):
    pre = make_dataset(tmp_path)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    return {"pre": pre, "tmp": tmp_path}


TRAINERS = {"banet": "BANetTrainer", "cotr": "CoTrTrainer", "uniseg": "UniSegTrainer", "dodnet": "DoDNetTrainer",
            "transdodnet": "TransDoDNetTrainer"}
NETWORK_FILES = {"banet": "BANetPlainConvUNet", "cotr": "CoTr", "uniseg": "UniSeg", "dodnet": "DoDNet",
                 "transdodnet": "TransDoDNet"}
FITTED_PATCH = {"banet": [16, 40, 40], "cotr": [16, 32, 32], "uniseg": [8, 32, 32], "dodnet": [16, 32, 32],
                "transdodnet": [16, 32, 32]}


@pytest.mark.parametrize("method", sorted(TRAINERS))
def test_model_folder_is_what_nnunets_predictor_loads(method, checkpoints, env, capsys):
    source, official, kwargs = checkpoints[method]
    path = str(env["tmp"] / f"{method}_official.pth")
    torch.save(official, path)
    args = ["convert-checkpoint", method, "-i", path, "-d", "20", "-c", "3d_fullres", "-f", "1"]
    if kwargs:
        args += ["--arch-kwargs", json.dumps(kwargs)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    model = env["tmp"] / "nnUNet_results" / DATASET / f"{TRAINERS[method]}__nnUNetPlans__3d_fullres"
    assert ("predict-multitask" in printed) == (method in ("uniseg", "dodnet", "transdodnet"))
    assert str(model) in printed
    assert sorted(os.listdir(model)) == ["dataset.json", "dataset_fingerprint.json", "fold_1", "plans.json"]
    plans = json.loads((model / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert list(plans["configurations"]) == ["3d_fullres"]
    assert cfg["architecture"]["network_class_name"].endswith("." + NETWORK_FILES[method])
    assert cfg["patch_size"] == FITTED_PATCH[method]
    assert cfg["spacing"] == [2.0, 1.0, 1.0] and cfg["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert ("multitask" in plans) == (method in ("uniseg", "dodnet", "transdodnet"))
    assert json.loads((model / "dataset.json").read_text())["labels"] == SPEC.combined_labels_dict()
    ckpt = torch.load(model / "fold_1" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINERS[method] and ckpt["init_args"]["configuration"] == "3d_fullres"
    assert ckpt["init_args"]["fold"] == 1 and ckpt["inference_allowed_mirroring_axes"] == (0, 1, 2)

    # nnU-Net's predictor (the multi-task one for multi-task models) rebuilds the network from the folder
    cls = MultiTaskPredictor if "multitask" in plans else nnUNetPredictor
    predictor = cls(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (1,))
    network = predictor.network
    network.load_state_dict(predictor.list_of_parameters[0])
    assert type(network) is type(source)
    ours = source.state_dict()
    assert set(network.state_dict()) == set(ours)
    for k, v in network.state_dict().items():
        assert torch.equal(v, ours[k]), k
    source.eval(), network.eval()
    x = torch.randn(1, N_IN, *FITTED_PATCH[method])
    with torch.no_grad():
        if method in ("cotr", "banet"):
            source.deep_supervision = False if method == "cotr" else source.deep_supervision
            if method == "banet":
                source.decoder.deep_supervision = False
            torch.testing.assert_close(network(x), source(x), rtol=0, atol=0)
        else:   # task B: both channels; the trainer's UniSeg slices each task's channels, ours is given them
            expected = source(x, torch.tensor([1]))
            got = network(x, torch.tensor([1]))
            torch.testing.assert_close(got[0] if isinstance(got, list) else got,
                                       expected[0] if isinstance(expected, list) else expected, rtol=0, atol=0)


def test_errors_name_what_does_not_fit(checkpoints, env):
    # a DoDNet checkpoint with 3 tasks for a 2-task dataset: the controller does not fit, the hint says why
    net = randomize(DoDNet(N_IN, 2, 3, **TINY_DODNET), 0)
    path = str(env["tmp"] / "dod3.pth")
    torch.save({"model": to_official(net, names.DODNET)}, path)
    with pytest.raises(CheckpointMismatch, match=r"controller\.weight.*2 task\(s\) \['A', 'B'\]"):
        write_model_folder("dodnet", path, 20, "3d_fullres", arch_kwargs=TINY_DODNET)
    assert not os.path.exists(env["tmp"] / "nnUNet_results" / DATASET)   # nothing half-written

    source, official, kwargs = checkpoints["cotr"]
    path = str(env["tmp"] / "cotr.pth")
    torch.save(official, path)
    model = write_model_folder("cotr", path, DATASET, "3d_lowres", arch_kwargs=kwargs)   # inherited configuration
    assert json.load(open(os.path.join(model, "plans.json")))["configurations"]["3d_lowres"]["spacing"] == [4.0, 2.0, 2.0]
    with pytest.raises(FileExistsError, match="fold_0.*--overwrite"):
        write_model_folder("cotr", path, DATASET, "3d_lowres", arch_kwargs=kwargs)
    with pytest.raises(FileExistsError, match="other plans"):
        write_model_folder("cotr", path, DATASET, "3d_lowres", fold=2, arch_kwargs={**kwargs, "dropout": 0.2})
    write_model_folder("cotr", path, DATASET, "3d_lowres", arch_kwargs=kwargs, overwrite=True)
    with pytest.raises(CheckpointMismatch, match="transformer.layers.0.self_attn.sampling_offsets.weight"):
        write_model_folder("cotr", path, DATASET, "3d_fullres", arch_kwargs={**kwargs, "num_points": 1})
    with pytest.raises(FileNotFoundError, match="not preprocessed"):
        write_model_folder("cotr", path, 21, "3d_fullres")
    with pytest.raises(FileNotFoundError, match="nnUNetPlans_x.json does not exist"):
        write_model_folder("cotr", path, 20, "3d_fullres", plans_identifier="nnUNetPlans_x")
    with pytest.raises(ValueError, match="no configuration '2d'"):
        write_model_folder("cotr", path, 20, "2d")
