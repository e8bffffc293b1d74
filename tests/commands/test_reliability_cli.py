"""Issue 13 from the command line: path errors and Ctrl-C in one line, input checks before prediction
(check-input, challenge-infer, predict-multitask), synth-release options, -np defaults, combine's progress bar."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import SimpleITK as sitk

from nnunet_plugins import cli
from nnunet_plugins.dataset_conversion import synthetic_releases as synth
from nnunet_plugins.dataset_conversion.common import ChallengeError


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nnunet_plugins", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


# item 5: an invalid output location is one line naming it; Ctrl-C is one line and exit code 130
def test_invalid_output_location_and_interrupt_are_one_line(tmp_path, capsys, monkeypatch):
    rel = synth.kipa22(tmp_path / "kipa")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    r = _cli("convert", "kipa22", rel, "--raw", str(not_a_folder), "--no-progress", "-np", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"nnunet-plugins convert: error: the nnU-Net raw folder {not_a_folder} is a file, " \
                               "not a folder"
    r = _cli("evaluate", "kipa22", os.path.join(rel, "train", "label"), rel, "-o", str(not_a_folder / "sub"),
             "--no-progress", "-np", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(not_a_folder) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "raw" / "x"))
    monkeypatch.setattr("nnunet_plugins.dataset_conversion.common.write_bytes", denied)
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "kipa22", rel, "--raw", str(tmp_path / "raw"), "--no-progress", "-np", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and str(tmp_path / "raw") in err and "Traceback" not in err

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("nnunet_plugins.dataset_conversion.common.load_file", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "kipa22", rel, "--raw", str(tmp_path / "raw2"), "--no-progress", "-np", "1"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "nnunet-plugins convert: interrupted"


@pytest.mark.parametrize("argv,prog,unknown", [
    (["convert", "kipa22", "REL", "--bogus", "x"], "nnunet-plugins convert kipa22", "--bogus x"),
    (["evaluate", "amos22", "a", "b", "--ignore-geometry"], "nnunet-plugins evaluate amos22", "--ignore-geometry"),
    (["list", "--zzz"], "nnunet-plugins list", "--zzz"),
    (["banet", "split", "-d", "1", "--zzz"], "nnunet-plugins banet split", "--zzz"),
])
def test_unknown_option_error_names_the_sub_command(capsys, argv, prog, unknown):
    """argparse reports unknown options from the top-level parser (``nnunet-plugins: error:``); they are reported
    as the sub-command's other errors are, with its name and usage."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"{prog}: error: unrecognized arguments: {unknown}"
    assert err.startswith(f"usage: {prog} ")


def _raw_dataset(tmp_path, channels=2):
    raw = tmp_path / "raw"
    ds = raw / "Dataset077_Toy"
    ds.mkdir(parents=True)
    json.dump({"channel_names": {str(i): "CT" for i in range(channels)}, "labels": {"background": 0, "a": 1},
               "numTraining": 0, "file_ending": ".nii.gz"}, open(ds / "dataset.json", "w"))
    images = tmp_path / "in"
    images.mkdir()
    for case in ("c1", "c2"):
        for ch in range(channels):
            img = sitk.GetImageFromArray((sitk.GetArrayFromImage(sitk.Image(24, 24, 12, sitk.sitkInt16)) + ch))
            img.SetSpacing((0.8, 0.8, 2.0))
            sitk.WriteImage(img, str(images / f"{case}_{ch:04d}.nii.gz"), True)
    return raw, images


# item 8: check-input names the file for a missing channel, a truncated file or channel geometry
def test_check_input_command(tmp_path):
    raw, images = _raw_dataset(tmp_path)
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pp"), "nnUNet_results": str(tmp_path / "res")}
    r = _cli("check-input", "-d", "77", "-i", str(images), "-np", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert "2 case(s) with 2 channel(s) each" in r.stdout and "reader SimpleITKIO" in r.stdout
    assert "2/2" in r.stderr   # the progress bar, unless --no-progress
    r = _cli("check-input", "-d", "77", "-i", str(images), "-np", "1", "--no-progress", env=env)
    assert r.returncode == 0 and "2 case(s) with 2 channel(s) each" in r.stdout and r.stderr == "", r.stderr
    os.remove(images / "c2_0001.nii.gz")
    r = _cli("check-input", "-d", "77", "-i", str(images), "-np", "1", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "case c2: channels 0000 found, the model takes 2 (0000 .. 0001): missing c2_0001.nii.gz" in r.stderr
    sitk.WriteImage(sitk.ReadImage(str(images / "c1_0001.nii.gz")), str(images / "c2_0001.nii.gz"), True)
    _truncate(images / "c1_0000.nii.gz")
    r = _cli("check-input", "-d", "77", "-i", str(images), "-np", "1", env=env)
    assert r.returncode == 2
    assert f"case c1, file {images / 'c1_0000.nii.gz'}: cannot read channel 0000 image: the file is truncated" \
        in r.stderr


def test_predict_multitask_and_challenge_infer_check_inputs_first(tmp_path):
    from nnunet_plugins.dataset_conversion import container
    from nnunet_plugins.multitask.prediction import predict_multitask

    raw, images = _raw_dataset(tmp_path, channels=3)
    model = raw / "Dataset077_Toy"          # dataset.json is all the check reads; there is no checkpoint
    os.remove(images / "c1_0002.nii.gz")
    with pytest.raises(ChallengeError, match=r"case c1: channels 0000, 0001 found, the model takes 3 \(0000 .. "
                                             r"0002\): missing c1_0002\.nii\.gz"):
        predict_multitask(str(model), str(images), str(tmp_path / "out"))
    # challenge-infer (AMOS22 test phase): a truncated input image stops before any prediction
    inp = tmp_path / "input"
    inp.mkdir()
    rel = synth.amos22(tmp_path / "amos")
    for case in ("amos_0011", "amos_0512"):
        data = open(os.path.join(rel, "imagesTs", f"{case}.nii.gz"), "rb").read()
        open(inp / f"{case}.nii.gz", "wb").write(data)
    _truncate(inp / "amos_0512.nii.gz")
    predictor = SimpleNamespace(dataset_json={"channel_names": {"0": "zscore"}, "file_ending": ".nii.gz"})
    with pytest.raises(ChallengeError, match=r"case amos_0512, file .*amos_0512\.nii\.gz: cannot read channel 0000 "
                                             r"image: the file is truncated"):
        container.run_amos22(str(inp), str(tmp_path / "output"), predictor, str(tmp_path / "work"))
    predictor.dataset_json["channel_names"]["1"] = "zscore"
    with pytest.raises(ChallengeError, match=r"2 case\(s\) in .*input do not fit the model:\n  case amos_0011: 1 "
                                             r"channel file\(s\), the model takes 2"):
        container.run_amos22(str(inp), str(tmp_path / "output"), predictor, str(tmp_path / "work"))


# item 9: synth-release sizes; one -np default (nnUNet_def_n_proc); combine shows the converters' progress bar
def test_synth_release_options(tmp_path):
    r = _cli("synth-release", "myops2020", str(tmp_path / "m"), "--cases", "2", "--test-cases", "2", "--shape", "3",
             "20", "24")
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(tmp_path / "m" / "train25")) == 6 and len(os.listdir(tmp_path / "m" / "test20")) == 6
    assert sitk.ReadImage(str(tmp_path / "m" / "test20" / "myops_test_202_DE.nii.gz")).GetSize() == (24, 20, 3)
    r = _cli("synth-release", "kipa22", str(tmp_path / "k"), "--cases", "4", "--test-cases", "0")
    assert r.returncode == 0 and sorted(os.listdir(tmp_path / "k" / "train" / "label")) == [
        "0.nii.gz", "1.nii.gz", "2.nii.gz", "3.nii.gz"] and not os.path.isdir(tmp_path / "k" / "test")
    r = _cli("synth-release", "kits21", str(tmp_path / "t"), "--test-cases", "1")
    assert r.returncode == 2 and "no test images" in r.stderr
    r = _cli("synth-release", "--help")
    assert "--cases" in r.stdout and "--shape" in r.stdout


def test_num_processes_default_is_nnunets(tmp_path):
    code = ("from nnunet_plugins.cli import build_parser; p = build_parser(); "
            "print([p.parse_args(a).num_processes for a in (['convert', 'kits21', 'x'], "
            "['export', 'amos22', 'p', 'o', '--images', 'i'], ['evaluate', 'kipa22', 'p', 'g'], "
            "['combine', '-d', '1', '-o', '2'], ['check-input', '-d', '1', '-i', 'x'])])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, nnUNet_def_n_proc="5"))
    assert r.stdout.strip() == "[5, 5, 5, 5, 5]", r.stderr


def test_combine_shows_a_progress_bar(tmp_path, capsys):
    from multitask_helpers import make_sources
    from nnunet_plugins.multitask.combine import combine_datasets

    raw = str(tmp_path / "raw")
    make_sources(raw)
    combine_datasets([11, 12], 20, "Uni", raw_root=raw, num_processes=1, verbose=True)
    err = capsys.readouterr().err
    assert "writing Dataset020_Uni: 100%" in err and "7/7" in err


# item 5 with real worker processes: Ctrl-C during a parallel conversion is one line, exit 130, no worker tracebacks
def test_ctrl_c_during_parallel_conversion(tmp_path):
    import signal
    import time
    rel = synth.kits21(tmp_path / "kits", num_cases=24, shape=(24, 96, 96))
    raw = tmp_path / "raw"
    proc = subprocess.Popen([sys.executable, "-m", "nnunet_plugins", "convert", "kits21", str(rel), "--raw", str(raw),
                             "-np", "2", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    partial = raw / ".Dataset135_KiTS2021.partial"
    deadline = time.time() + 60
    while not partial.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)       # as a terminal does: the main process and its workers
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "nnunet-plugins convert: interrupted"
    # the rerun resumes and finishes
    r = _cli("convert", "kits21", str(rel), "--raw", str(raw), "-np", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(raw / "Dataset135_KiTS2021" / "imagesTr")) == 24
