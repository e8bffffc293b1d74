"""The challenge commands from the command line, as a user runs them."""
import os
import subprocess
import sys



def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nnunet_plugins", *args], capture_output=True, text=True,
                          env=env or dict(os.environ))


def test_synth_convert_export_evaluate_from_the_command_line(tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"))
    rel = str(tmp_path / "rel")
    r = _cli("synth-release", "kipa22", rel, env=env)
    assert r.returncode == 0, r.stderr
    r = _cli("convert", "kipa22", rel, "-d", "77", "--name", "KiPA", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    folder = os.path.join(tmp_path, "raw", "Dataset077_KiPA")
    assert r.stdout.strip().endswith(folder) and os.path.isfile(os.path.join(folder, "dataset.json"))
    # rerun: nothing to do
    r = _cli("convert", "kipa22", rel, "-d", "77", "--name", "KiPA", "--no-progress", env=env)
    assert r.returncode == 0 and "up to date" in r.stdout
    r = _cli("export", "kipa22", os.path.join(folder, "labelsTr"), str(tmp_path / "sub"), "--images",
             os.path.join(rel, "train", "image"), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "sub")) == ["0.nii.gz", "1.nii.gz", "2.nii.gz"]
    r = _cli("evaluate", "kipa22", str(tmp_path / "sub"), rel, "-o", str(tmp_path / "ev"), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    assert "KiPA22: 3 cases" in r.stdout and "Kidney" in r.stdout
    assert sorted(os.listdir(tmp_path / "ev")) == ["kipa22_evaluation.json", "kipa22_per_case.csv",
                                                   "kipa22_summary.csv"]
    with open(tmp_path / "ev" / "kipa22_per_case.csv") as f:
        header = f.readline().strip().split(",")
    assert header[:3] == ["case", "DSC_Vein", "DSC_Kidney"] and "AVD_Tumor" in header


def test_bad_input_is_one_clear_error_line(tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"))
    (tmp_path / "nothing").mkdir()
    r = _cli("convert", "myops2020", str(tmp_path / "nothing"), "--no-progress", env=env)
    assert r.returncode == 2
    assert r.stderr.startswith("nnunet-plugins convert: error:") and "not a MyoPS2020 release" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("export", "amos22", str(tmp_path / "nothing"), str(tmp_path / "o"), "--images", str(tmp_path / "nothing"),
             env=env)
    assert r.returncode == 2 and "no AMOS22 task 2 images" in r.stderr


def test_help_lists_every_challenge():
    for command in ("convert", "export", "evaluate", "synth-release", "challenge-infer"):
        r = _cli(command, "--help")
        assert r.returncode == 0
        for c in ("kits21", "amos22", "segrap2023") + (() if command == "challenge-infer" else ("myops2020", "kipa22")):
            assert c in r.stdout, (command, c)


def test_amos22_evaluate_task_from_the_command_line(tmp_path):
    rel = str(tmp_path / "rel")
    assert _cli("synth-release", "amos22", rel).returncode == 0
    preds = tmp_path / "ct_only"
    preds.mkdir()
    os.link(os.path.join(rel, "labelsVa", "amos_0008.nii.gz"), preds / "amos_0008.nii.gz")
    r = _cli("evaluate", "amos22", str(preds), rel, "-o", str(tmp_path / "ev"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "task 1 inferred from the predictions (no MRI case predicted; pass --task 2" in r.stdout
    # as a task-2 submission the validation MRI case is missing: one line naming it, exit 2
    r = _cli("evaluate", "amos22", str(preds), rel, "-o", str(tmp_path / "ev"), "--no-progress", "--task", "2")
    assert r.returncode == 2 and "missing" in r.stderr and "amos_0510" in r.stderr and "Traceback" not in r.stderr
    r = _cli("evaluate", "amos22", str(preds), rel, "--task", "3")
    assert r.returncode == 2 and "invalid choice: 3" in r.stderr
