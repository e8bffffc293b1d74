"""The prepared device check (scripts/device_check.sh, nnunet_plugins/device_check.py): the wheel preparation
(command lines, size accounting, LZMA repacking, manifest), the JSON/markdown writer, and the script's CPU mode
end to end (slow)."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from nnunet_plugins import device_check as dc
from nnunet_plugins.registry import standalone_trainer_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIP = ["python3", "-m", "pip"]


def test_download_commands_fetch_exactly_the_list_for_cpython312_x86_64():
    cmds = dc.download_commands("/w", PIP, project_root="/repo")
    assert len(cmds) == len(dc.WHEELS) + 1
    for cmd, (name, version, how) in zip(cmds, dc.WHEELS):
        assert cmd[:3] == PIP and cmd[-1] == f"{name}=={version}"
        assert "--no-deps" in cmd
        if how == "binary":
            assert cmd[3] == "download" and "--only-binary=:all:" in cmd
            assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("-d") + 1] == "/w"
            platforms = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"]
            assert "manylinux2014_x86_64" in platforms and all(p.endswith("_x86_64") for p in platforms)
        else:
            assert cmd[3] == "wheel" and cmd[cmd.index("-w") + 1] == "/w"
    assert cmds[-1] == PIP + ["wheel", "--no-deps", "-w", "/w", "/repo"]
    names = {dc._normalise(n) for n, _, _ in dc.WHEELS}
    # what the issue names, and never torch or another copy of what a PyTorch node has
    assert {"nnunetv2", "simpleitk", "batchgeneratorsv2", "dynamic_network_architectures", "acvl_utils"} <= names
    assert not names & {"torch", "numpy", "scipy", "triton"}
    with pytest.raises(ValueError, match="unknown wheel kind"):
        dc.download_commands("/w", PIP, wheels=(("x", "1", "sdist"),))


WHEEL_LIST = (("alpha", "1.0", "binary"), ("beta-pkg", "2.0", "build"))


def _fake_pip(sizes, calls, fail=None, compressible=(), skip=()):
    """A stand-in for subprocess.run of pip: writes a wheel (zip with one stored member of the given size)."""
    def run(cmd, **kwargs):
        calls.append(cmd)
        if fail and fail in cmd[-1]:
            return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution found\n")
        dest = cmd[cmd.index("-d" if "download" in cmd else "-w") + 1]
        target = cmd[-1]
        if "==" in target:
            name, version = target.split("==")
            tag = "cp312-cp312-manylinux_2_28_x86_64" if "download" in cmd else "py3-none-any"
        else:
            name, version, tag = "nnunet_plugins", "0.1.0", "py3-none-any"
        name = dc._normalise(name)
        if name in skip:
            return subprocess.CompletedProcess(cmd, 0, stdout="")
        size = sizes.get(name, 1000)
        payload = b"a" * size if name in compressible else np.random.default_rng(0).bytes(size)
        with zipfile.ZipFile(os.path.join(dest, f"{name}-{version}-{tag}.whl"), "w", zipfile.ZIP_STORED) as z:
            z.writestr(f"{name}/data.bin", payload)
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n")
    return run


def test_prepare_writes_manifest_and_repacks_large_wheels(tmp_path):
    calls = []
    sizes = {"alpha": 3 * dc.MIB, "beta_pkg": 2000}
    dest = str(tmp_path / "wheels")
    manifest = dc.prepare(dest, pip=PIP, wheels=WHEEL_LIST, project_root="/repo", budget_bytes=4 * dc.MIB,
                          repack_min_bytes=dc.MIB, run=_fake_pip(sizes, calls, compressible={"alpha"}),
                          log=lambda m: None)
    assert [c[3] for c in calls] == ["download", "wheel", "wheel"] and calls[-1][-1] == "/repo"
    files = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
    assert [w["file"] for w in manifest["wheels"]] == files and len(files) == 3
    on_disk = {f: os.path.getsize(os.path.join(dest, f)) for f in files}
    assert {w["file"]: w["bytes"] for w in manifest["wheels"]} == on_disk
    assert manifest["total_bytes"] == sum(on_disk.values()) <= 4 * dc.MIB
    assert json.load(open(os.path.join(dest, "manifest.json"))) == manifest
    # the compressible 3 MiB wheel was re-zipped with LZMA: far smaller, same member bytes
    alpha = os.path.join(dest, next(f for f in files if f.startswith("alpha")))
    assert on_disk[os.path.basename(alpha)] < dc.MIB // 10
    with zipfile.ZipFile(alpha) as z:
        assert z.infolist()[0].compress_type == zipfile.ZIP_LZMA
        assert z.read("alpha/data.bin") == b"a" * (3 * dc.MIB)
    # the small one was left as it was (stored)
    with zipfile.ZipFile(os.path.join(dest, next(f for f in files if f.startswith("beta")))) as z:
        assert z.infolist()[0].compress_type == zipfile.ZIP_STORED
    assert sorted(dc.verify_wheels(dest)) == sorted(os.path.join(dest, f) for f in files)
    with open(alpha, "ab") as f:
        f.write(b"x")
    with pytest.raises(dc.DeviceCheckError, match="different from manifest"):
        dc.verify_wheels(dest)


def test_prepare_fails_clearly_over_budget_and_keeps_the_old_folder(tmp_path):
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / "old.txt").write_text("previous preparation")
    sizes = {"alpha": 3 * dc.MIB, "beta_pkg": 2 * dc.MIB}   # incompressible: 5 MiB after repacking too
    with pytest.raises(dc.DeviceCheckError) as err:
        dc.prepare(str(dest), pip=PIP, wheels=WHEEL_LIST, project_root="/repo", budget_bytes=4 * dc.MIB,
                   run=_fake_pip(sizes, []), log=lambda m: None)
    msg = str(err.value)
    assert "more than the budget of 4.00 MiB" in msg and "alpha-1.0" in msg and "beta_pkg-2.0" in msg
    assert "5.00 MiB  total" in msg
    assert sorted(os.listdir(dest)) == ["old.txt"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".device_wheels.tmp")], "temporary folder left"


def test_prepare_reports_pip_failures_and_missing_wheels(tmp_path):
    with pytest.raises(dc.DeviceCheckError, match=r"(?s)pip failed \(exit 1\).*beta-pkg==2.0.*No matching"):
        dc.prepare(str(tmp_path / "a"), pip=PIP, wheels=WHEEL_LIST, project_root="/repo",
                   run=_fake_pip({}, [], fail="beta-pkg"), log=lambda m: None)
    with pytest.raises(dc.DeviceCheckError, match=r"missing \['alpha'\]"):
        dc.prepare(str(tmp_path / "b"), pip=PIP, wheels=WHEEL_LIST, project_root="/repo",
                   run=_fake_pip({}, [], skip={"alpha"}), log=lambda m: None)
    with pytest.raises(dc.DeviceCheckError, match="run 'scripts/device_check.sh prepare'"):
        dc.verify_wheels(str(tmp_path / "nothing"))


RESULTS = {
    "device": "cuda", "amp": True, "size": "official", "ok": False, "elapsed_s": 301.4,
    "environment": {"device_name": "NVIDIA H200", "torch": "2.11.0", "nnunetv2": "2.8.1"},
    "trainers": [
        {"trainer": "CoTrTrainer", "patch": [48, 192, 192], "batch_size": 2, "parameters": 41_872_504,
         "median_step_s": 0.25, "step_ratio": 1.25, "peak_memory_bytes": 12 * 2 ** 30, "losses": [3.5, 2.25],
         "ok": True, "baseline": {"median_step_s": 0.2, "peak_memory_bytes": 8 * 2 ** 30}},
        {"trainer": "BANetTrainer", "ok": False, "error": "RuntimeError: boom"},
        {"trainer": "UniSegTrainer", "ok": False, "skipped": "time budget used up"},
    ],
    "predict": {"trainer": "CoTrTrainer", "cases": 2, "seconds": 12.0, "baseline_seconds": 10.0, "ratio": 1.2,
                "ok": True},
    "deformable_attention": {"levels": [[12, 24, 24], [6, 12, 12]], "tokens": 7776, "batch": 2, "heads": 6,
                             "head_dim": 64, "points": 4, "fwd_bwd_s": 0.0123, "peak_memory_bytes": 2 ** 29,
                             "max_abs_diff": 2.5e-7, "ok": True},
}
EXPECTED_MD = """\
Device check: FAILED on NVIDIA H200 (device cuda, AMP, sizes official; torch 2.11.0, nnU-Net 2.8.1, 301 s)

| trainer | patch x batch | parameters | step ms | nnUNetTrainer step ms | step ratio | peak GiB | nnUNetTrainer peak GiB | loss first -> last | ok |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| CoTrTrainer | 48x192x192 x 2 | 41.87M | 250.0 | 200.0 | 1.25 | 12.00 | 8.00 | 3.500 -> 2.250 | yes |
| BANetTrainer | - | - | - | - | - | - | - | - | ERROR: RuntimeError: boom |
| UniSegTrainer | - | - | - | - | - | - | - | - | skipped: time budget used up |

nnUNetv2_predict (CoTrTrainer, 2 cases, process start included): 12.0 s; nnUNetTrainer at the same plans 10.0 s; ratio 1.20; outputs ok

Deformable attention fwd+bwd (12x24x24 + 6x12x12 = 7776 tokens, batch 2, 6 heads x 64, 4 points): 12.3 ms, peak 0.50 GiB, max |diff| vs reference 2.50e-07; ok
"""


def test_results_writer_json_and_markdown(tmp_path):
    assert dc.render_markdown(RESULTS) == EXPECTED_MD
    json_file, md_file = dc.write_results(str(tmp_path / "out"), RESULTS)
    assert json.load(open(json_file)) == RESULTS
    assert open(md_file).read() == EXPECTED_MD
    assert sorted(os.listdir(tmp_path / "out")) == ["device_check.json", "device_check.md"]


def test_script_usage_errors():
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), "bogus"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "prepare" in res.stderr and "run OUT_DIR" in res.stderr


@pytest.mark.slow
def test_device_check_script_cpu_mode_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, DEVICE_CHECK_USE_INSTALLED="1", OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), "run", str(out), "--device",
                          "cpu", "--steps", "3"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.load(open(out / "device_check.json"))
    assert results["ok"] and results["device"] == "cpu" and results["size"] == "tiny"
    rows = {r["trainer"]: r for r in results["trainers"]}
    assert list(rows) == [p.rpartition(".")[2] for p in standalone_trainer_paths()]
    for name, row in rows.items():
        assert row["loss_decreased"] and len(row["losses"]) == 3, (name, row)
        assert row["baseline"]["trainer"] == "nnUNetTrainer" and row["baseline"]["patch"] == row["patch"]
        assert row["step_ratio"] == pytest.approx(row["median_step_s"] / row["baseline"]["median_step_s"])
    assert rows["CoTrTrainer"]["plans"].endswith("_CoTr")   # the tiny CoTr through the plans' architecture entry
    assert results["predict"]["ok"] and results["predict"]["cases"] == 2
    assert results["deformable_attention"]["ok"] and results["deformable_attention"]["max_abs_diff"] < 1e-4
    md = open(out / "device_check.md").read()
    assert md.startswith("Device check: PASSED") and all(f"| {name} |" in md for name in rows)
    assert os.path.isfile(out / "device_check_log.txt")
