"""``nnunet-plugins medseqft run`` from the command line: bad input is one clear line before any training; a
stage killed during its training leaves no finished-looking output, a rerun continues it (teacher and finished
stages not retrained) and a further rerun skips every stage. Tiny U-Net, 2-3 iterations per phase."""
import json
import os
import signal
import subprocess
import time

from types import SimpleNamespace

import pytest
import torch

from nnunet_plugins import cli

from medseqft_helpers import PLUGINS, make_datasets, medseqft_env, nnunet_checkpoint, plan_tiny, plugins

RUN = ["--cube-size", "8", "-k", "2", "--repeats", "2", "-device", "cpu", "--epochs", "3", "--iterations", "3",
       "--val-iterations", "1", "-np", "1", "--no-val", "--head-iterations", "4"]
STUDENT = "MedSeqFTTrainer__MedSeqFTPlans__3d_fullres"
TEACHER = "MedSeqFTTeacherTrainer__MedSeqFTPlans__3d_fullres"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("medseqft_cli")
    env = medseqft_env(root)
    env["NNUNET_PLUGINS_SAVE_EVERY"] = "1"
    make_datasets(env, cases=5, test_cases=0, datasets={31: ("A", 1), 32: ("B", 2), 33: ("C", 1)})
    make_datasets(env, cases=2, test_cases=0, datasets={34: ("Two", 1)}, channels=2)
    pre, plans = plan_tiny(env, 33, str(root / "log.txt"))
    return {"env": env, "init": nnunet_checkpoint(env, pre, plans), "root": root}


def _one_line_error(result, *phrases):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def _trained_anything(env):
    results = env["nnUNet_results"]
    return [d for ds in os.listdir(results) for d in os.listdir(os.path.join(results, ds)) if "MedSeqFT" in d]


def _in_process(capsys, *args):
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=e.value.code, stdout=captured.out, stderr=captured.err)


def test_bad_input_is_one_line_before_any_training(setup, monkeypatch, capsys):
    from nnunetv2 import paths

    env, init = setup["env"], setup["init"]
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setattr(paths, name, env[name])
    r = _in_process(capsys, "medseqft", "run", "--init", init + ".missing", "--sequence", 31, *RUN)
    _one_line_error(r, "--init checkpoint", "does not exist")
    r = _in_process(capsys, "medseqft", "run", "--init", init, "--sequence", 31, 99, *RUN)
    _one_line_error(r, "unknown dataset 99")
    r = _in_process(capsys, "medseqft", "run", "--init", init, "--sequence", 31, 34, *RUN)
    _one_line_error(r, "Dataset034_Two has 2 input channel(s)", "trained on 1")
    r = _in_process(capsys, "medseqft", "run", "--init", init, "--sequence", 31, "-c", "2d_lowres", *RUN)
    _one_line_error(r, "no configuration '2d_lowres'")
    # another network in the checkpoint than the plans' U-Net
    bad = os.path.join(os.path.dirname(init), "other.pth")
    torch.save({"network_weights": {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(3)}}, bad)
    r = _in_process(capsys, "medseqft", "run", "--init", bad, "--sequence", 31, *RUN)
    _one_line_error(r, "does not hold the U-Net of its plans")
    assert _trained_anything(env) == []
    # no dataset was preprocessed for a run that was refused
    assert not os.path.isdir(os.path.join(env["nnUNet_preprocessed"], "Dataset031_A"))


def _mtimes(folder):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files}


@pytest.mark.slow
def test_kill_continue_and_skip(setup):
    """Killed in stage 2's student (LoRA) training; the rerun continues it; the next rerun skips both stages."""
    env, init = setup["env"], setup["init"]
    args = PLUGINS + ["medseqft", "run", "--init", init, "--sequence", "31", "32"] + RUN
    results = env["nnUNet_results"]
    stage2 = os.path.join(results, "Dataset032_B", STUDENT, "fold_0")
    log = open(setup["root"] / "killed.txt", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    latest = os.path.join(stage2, "checkpoint_latest.pth")
    deadline = time.time() + 400
    while not os.path.isfile(latest) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isfile(latest), open(setup["root"] / "killed.txt").read()[-3000:]
    # stage 1 finished; stage 2 has no record and no final model, its latest checkpoint is whole (adapters inside)
    stage1 = os.path.join(results, "Dataset031_A", STUDENT, "fold_0")
    assert os.path.isfile(os.path.join(stage1, "medseqft_stage.json"))
    assert not os.path.exists(os.path.join(stage2, "medseqft_stage.json"))
    assert not os.path.exists(os.path.join(stage2, "checkpoint_final.pth"))
    state = torch.load(latest, map_location="cpu", weights_only=False)
    assert any("lora_A" in k for k in state["network_weights"]) and state["current_epoch"] >= 1
    buffer = json.load(open(os.path.join(stage2, "medseqft_buffer.json")))
    assert len(buffer["case_ids"]) == 2 and len(buffer["scores"]) == 4     # fold 0 of 5 cases: 4 training cases
    teacher2 = os.path.join(results, "Dataset032_B", TEACHER, "fold_0")
    before = {**_mtimes(stage1), **_mtimes(teacher2), os.path.join(stage2, "medseqft_buffer.json"):
              os.path.getmtime(os.path.join(stage2, "medseqft_buffer.json"))}

    r = subprocess.run(args, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stage 1 (Dataset031_A): finished, skipped" in r.stdout
    assert f"MedSeqFTTrainer: continuing from {latest}" in r.stdout
    assert "MedSeqFTTeacherTrainer: finished" in r.stdout
    after = _mtimes(stage1) | _mtimes(teacher2)
    assert all(after[f] == t for f, t in before.items() if f in after), "finished outputs were rewritten"
    record = json.load(open(os.path.join(stage2, "medseqft_stage.json")))
    assert record["stage"] == 2 and record["sequence"] == ["Dataset031_A", "Dataset032_B"]
    final = torch.load(os.path.join(stage2, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3 and not any("lora" in k for k in final["network_weights"])
    assert {k for k in final["network_weights"] if ".heads.1." in k}   # two heads: tasks 1 and 2
    plans = json.load(open(os.path.join(os.path.dirname(stage2), "plans.json")))
    assert plans["medseqft"]["task_classes"] == [2, 3]

    done = _mtimes(os.path.join(results, "Dataset032_B"))
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("finished, skipped") == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert _mtimes(os.path.join(results, "Dataset032_B")) == done
    # other options for finished stages: refused, naming the stage record
    r = plugins(*args[3:], "--rank", "4", env=env)  # args[3:]: after "python -m nnunet_plugins"
    _one_line_error(r, "medseqft_stage.json belongs to another run", "options")
