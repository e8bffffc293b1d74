"""One prepared check of the whole package on an offline GPU node (``scripts/device_check.sh``).

Two steps:

``prepare`` (on a machine with network access, any OS): downloads the x86-64 CPython 3.12 wheels of what the
package imports at run time and a PyTorch node usually lacks (``WHEELS``: nnU-Net, SimpleITK, batchgenerators
v1/v2, dynamic-network-architectures, acvl-utils and the few non-torch libraries they import that are not in a
PyTorch image), builds this package's own wheel, and checks that the folder stays under the budget
(64 MiB: what a cluster job or a device session may carry). Wheels that are larger than 1 MiB are re-zipped
with LZMA entries (same files, same RECORD hashes; pip reads LZMA zips): SimpleITK alone shrinks from 52.8 to
28.8 MB, which is what brings the set under 64 MiB. ``manifest.json`` lists every wheel with its size and
sha256. No torch, no optional extras, ``--no-deps`` with an explicit list: the list was established from the
modules that training, planning, preprocessing and prediction import (``sys.modules`` after a run, mapped to
distributions) minus what a PyTorch node image provides (numpy, scipy, pandas, scikit-image, scikit-learn,
matplotlib, tifffile, httpx, msgpack, rich, threadpoolctl ...).

``run OUT_DIR`` (on the node, no network): the shell script installs the wheels into a temporary folder
(``pip install --no-index --no-deps --target``) and calls ``python -m nnunet_plugins.device_check run``, which
within a time budget (default 7 of the 8 minutes a node session allows):

* trains every plugin trainer of the registry through nnU-Net's own training code (``trainer_check``) on a
  synthetic dataset made on the node: on CUDA with AMP at the methods' published patches and widths, on
  CPU (``--device cpu``, the tests) at tiny sizes; loss finite and falling on a fixed batch, peak GPU memory,
  median step time against nnU-Net's default trainer at the same plans (same process);
* runs ``nnUNetv2_predict`` for the trained CoTr model and for nnU-Net's default trainer at the same plans
  (output files and their geometry checked, wall times compared);
* times CoTr's deformable attention forward + backward at the official token count (levels 12x24x24 and
  6x12x12 of the 48x192x192 patch, batch 2, 6 heads) and compares its output with the naive reference;
* writes ``device_check.json`` and ``device_check.md`` (the table for the README) into OUT_DIR, plus the
  full log ``device_check_log.txt``; exits 1 if any check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

MIB = 2 ** 20
DEFAULT_BUDGET_BYTES = 64 * MIB
REPACK_MIN_BYTES = 1 * MIB
PYTHON_VERSION = "3.12"
# the platform tags pip must accept for an x86-64 glibc node (pip matches each tag exactly)
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (distribution, version, how): "binary" = a wheel from the registry, "build" = a pure-Python package the
# registry has only as source, built here into a py3-none-any wheel. Versions: those this package is tested with.
WHEELS = (
    ("nnunetv2", "2.8.1", "binary"),
    ("batchgenerators", "0.25.5", "binary"),
    ("batchgeneratorsv2", "0.3.6", "binary"),
    ("dynamic-network-architectures", "0.4.4", "binary"),
    ("acvl-utils", "0.2.6", "build"),
    ("SimpleITK", "2.5.7", "binary"),
    ("blosc2", "4.15.0", "binary"),              # nnU-Net's preprocessed-data format
    ("ndindex", "1.10.1", "binary"),             # imported by blosc2
    ("connected-components-3d", "4.1.1", "binary"),  # imported by acvl-utils (cropping)
    ("nibabel", "5.4.2", "binary"),              # imported by nnU-Net's reader registry
)
OWN_PACKAGE = "nnunet-plugins"


class DeviceCheckError(RuntimeError):
    """A preparation or run step that cannot go on; the message says what and why."""


# ---- prepare ---------------------------------------------------------------------------------------------------
def download_commands(dest: str, pip: list, wheels=WHEELS, project_root: str = REPO_ROOT) -> list[list[str]]:
    """The pip command lines that fetch ``wheels`` into ``dest`` and build this package's wheel there."""
    commands = []
    for name, version, how in wheels:
        if how == "binary":
            cmd = pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
                         "--implementation", "cp"]
            for platform in PLATFORMS:
                cmd += ["--platform", platform]
            commands.append(cmd + ["-d", dest, f"{name}=={version}"])
        elif how == "build":
            commands.append(pip + ["wheel", "--no-deps", "-w", dest, f"{name}=={version}"])
        else:
            raise ValueError(f"unknown wheel kind {how!r} for {name} (expected 'binary' or 'build')")
    commands.append(pip + ["wheel", "--no-deps", "-w", dest, project_root])
    return commands


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def wheel_distribution(filename: str) -> str:
    """Normalised distribution name of a wheel file name (``simpleitk-2.5.7-cp311-...whl`` -> ``simpleitk``)."""
    if not filename.endswith(".whl") or filename.count("-") < 4:
        raise DeviceCheckError(f"{filename}: not a wheel file name (name-version-python-abi-platform.whl)")
    return _normalise(filename.split("-")[0])


def repack_lzma(path: str) -> int:
    """Re-zip a wheel with LZMA entries in place (same members, same bytes, so RECORD stays valid); new size."""
    tmp = path + ".lzma-tmp"
    try:
        with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zout:
            for info in zin.infolist():
                zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_LZMA)
        if os.path.getsize(tmp) < os.path.getsize(path):
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def size_report(sizes: dict, budget_bytes: int) -> str:
    lines = [f"  {size / MIB:8.2f} MiB  {name}" for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines + [f"  {sum(sizes.values()) / MIB:8.2f} MiB  total (budget {budget_bytes / MIB:.2f} MiB)"])


def prepare(dest: str, *, pip: list | None = None, wheels=WHEELS, project_root: str = REPO_ROOT,
            budget_bytes: int = DEFAULT_BUDGET_BYTES, repack_min_bytes: int = REPACK_MIN_BYTES,
            run=subprocess.run, log=print) -> dict:
    """Fill ``dest`` with the wheels (a fresh folder replaces an old one only when everything succeeded).

    Raises ``DeviceCheckError`` when a download fails, a wheel is missing or doubled, a built wheel is not pure
    Python, or the total exceeds ``budget_bytes`` (the message lists every wheel's size). Returns the manifest.
    """
    pip = pip or [sys.executable, "-m", "pip"]
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".device_wheels.tmp-", dir=parent)
    try:
        for cmd in download_commands(tmp, pip, wheels, project_root):
            log("$ " + " ".join(cmd))
            result = run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if result.returncode != 0:
                tail = "\n".join((result.stdout or "").splitlines()[-15:])
                raise DeviceCheckError(f"pip failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")
        files = sorted(f for f in os.listdir(tmp) if f.endswith(".whl"))
        by_dist: dict = {}
        for f in files:
            by_dist.setdefault(wheel_distribution(f), []).append(f)
        expected = [_normalise(name) for name, _, _ in wheels] + [_normalise(OWN_PACKAGE)]
        missing = [d for d in expected if d not in by_dist]
        doubled = {d: fs for d, fs in by_dist.items() if len(fs) > 1}
        extra = sorted(set(by_dist) - set(expected))
        if missing or doubled or extra:
            raise DeviceCheckError(f"wheel folder does not match the list: missing {missing}, several versions "
                                   f"{doubled}, unexpected {extra}")
        for (name, _, how) in wheels:
            f = by_dist[_normalise(name)][0]
            if how == "build" and not f.endswith("-none-any.whl"):
                raise DeviceCheckError(f"{f}: built wheel is platform-specific; only pure-Python packages may be "
                                       f"built here (the node is x86-64 CPython {PYTHON_VERSION})")
        sizes = {}
        for f in files:
            path = os.path.join(tmp, f)
            size = os.path.getsize(path)
            if size > repack_min_bytes:
                new = repack_lzma(path)
                if new < size:
                    log(f"repacked {f}: {size / MIB:.2f} -> {new / MIB:.2f} MiB (LZMA)")
                size = new
            sizes[f] = size
        total = sum(sizes.values())
        log(size_report(sizes, budget_bytes))
        if total > budget_bytes:
            raise DeviceCheckError(f"the wheels take {total / MIB:.2f} MiB, more than the budget of "
                                   f"{budget_bytes / MIB:.2f} MiB:\n{size_report(sizes, budget_bytes)}")
        manifest = {"python_version": PYTHON_VERSION, "platforms": list(PLATFORMS), "total_bytes": total,
                    "budget_bytes": budget_bytes,
                    "wheels": [{"file": f, "bytes": sizes[f], "sha256": _sha256(os.path.join(tmp, f))}
                               for f in files]}
        with open(os.path.join(tmp, "manifest.json"), "w") as fh:
            json.dump(manifest, fh, indent=2)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_wheels(folder: str) -> list[str]:
    """Check the wheel folder against its manifest (sizes and sha256); return the wheel paths."""
    manifest_file = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_file):
        raise DeviceCheckError(f"{manifest_file} not found: run 'scripts/device_check.sh prepare' on a machine "
                               f"with network access first")
    manifest = json.load(open(manifest_file))
    paths = []
    for entry in manifest["wheels"]:
        path = os.path.join(folder, entry["file"])
        if not os.path.isfile(path) or _sha256(path) != entry["sha256"]:
            raise DeviceCheckError(f"{path}: missing or different from manifest.json (copy the folder again)")
        paths.append(path)
    return paths


# ---- results: JSON and markdown --------------------------------------------------------------------------------
def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _gib(nbytes) -> str:
    return "-" if not nbytes else f"{nbytes / 2 ** 30:.2f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _params(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def render_markdown(results: dict) -> str:
    """The results as markdown: environment line, trainer table, prediction and deformable-attention lines."""
    env = results.get("environment", {})
    lines = [f"Device check: {'PASSED' if results.get('ok') else 'FAILED'} on {env.get('device_name', '?')} "
             f"(device {results.get('device')}, {'AMP' if results.get('amp') else 'fp32'}, sizes "
             f"{results.get('size')}; torch {env.get('torch', '?')}, nnU-Net {env.get('nnunetv2', '?')}, "
             f"{results.get('elapsed_s', 0):.0f} s)", "",
             "| trainer | patch x batch | parameters | step ms | nnUNetTrainer step ms | step ratio | peak GiB "
             "| nnUNetTrainer peak GiB | loss first -> last | ok |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results.get("trainers", []):
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['trainer']} | - | - | - | - | - | - | - | - | "
                         f"{'skipped: ' + row['skipped'] if 'skipped' in row else 'ERROR: ' + row['error']} |")
            continue
        base = row.get("baseline", {})
        patch = "x".join(map(str, row["patch"])) + f" x {row['batch_size']}"
        lines.append(f"| {row['trainer']} | {patch} | {_params(row['parameters'])} | {_ms(row['median_step_s'])} | "
                     f"{_ms(base.get('median_step_s'))} | {_ratio(row.get('step_ratio'))} | "
                     f"{_gib(row.get('peak_memory_bytes'))} | {_gib(base.get('peak_memory_bytes'))} | "
                     f"{row['losses'][0]:.3f} -> {row['losses'][-1]:.3f} | {'yes' if row['ok'] else 'NO'} |")
    def predict_line(pred):
        return (f"nnUNetv2_predict ({pred['trainer']}, {pred['cases']} cases, process start included): "
                f"{pred['seconds']:.1f} s; nnUNetTrainer at the same plans {pred['baseline_seconds']:.1f} s; "
                f"ratio {pred['ratio']:.2f}; outputs {'ok' if pred['ok'] else 'WRONG'}")

    def attention_line(attn):
        levels = " + ".join("x".join(map(str, s)) for s in attn["levels"])
        return (f"Deformable attention fwd+bwd ({levels} = {attn['tokens']} tokens, batch {attn['batch']}, "
                f"{attn['heads']} heads x {attn['head_dim']}, {attn['points']} points): "
                f"{_ms(attn['fwd_bwd_s'])} ms, peak {_gib(attn.get('peak_memory_bytes'))} GiB, "
                f"max |diff| vs reference {attn['max_abs_diff']:.2e}; {'ok' if attn['ok'] else 'WRONG'}")

    for key, title, describe in (("predict", "nnUNetv2_predict", predict_line),
                                 ("deformable_attention", "Deformable attention", attention_line)):
        entry = results.get(key)
        if entry:
            lines += ["", f"{title}: ERROR {entry['error']}" if entry.get("error") else describe(entry)]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, results: dict, stem: str = "device_check") -> tuple[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir`` (atomically); return their paths."""
    from nnunet_plugins.atomic import atomic_output, write_json

    os.makedirs(out_dir, exist_ok=True)
    json_file, md_file = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")
    write_json(results, json_file)
    with atomic_output(md_file) as tmp:
        with open(tmp, "w") as f:
            f.write(render_markdown(results))
    return json_file, md_file


# ---- run -------------------------------------------------------------------------------------------------------
def environment_info(device: str) -> dict:
    import platform
    from importlib.metadata import version

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
            "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        info.update(device_name=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def check_deformable_attention(device: str, levels, batch: int = 2, heads: int = 6, head_dim: int = 64,
                               points: int = 4, repeats: int = 3) -> dict:
    """Forward + backward of ``ms_deform_attn_3d`` (median time, peak memory) and its largest output difference
    from ``ms_deform_attn_reference`` (the naive loop) on the same inputs, fp32."""
    import statistics

    import torch

    from nnunet_plugins.architectures.blocks.deformable_attention import (
        ms_deform_attn_3d, ms_deform_attn_reference, reference_points_3d,
    )

    levels = [tuple(int(v) for v in s) for s in levels]
    tokens = sum(d * h * w for d, h, w in levels)
    g = torch.Generator().manual_seed(0)
    value = torch.randn(batch, tokens, heads, head_dim, generator=g)
    ref = reference_points_3d(levels)
    loc = ref[None, :, None, None, None, :] + torch.randn(batch, tokens, heads, len(levels), points, 3,
                                                          generator=g) * 0.05
    weights = torch.softmax(torch.randn(batch, tokens, heads, len(levels) * points, generator=g), -1)
    weights = weights.view(batch, tokens, heads, len(levels), points)
    value, loc, weights = (t.to(device) for t in (value, loc, weights))
    cuda = device == "cuda"
    times = []
    for _ in range(repeats + 1):
        v = value.clone().requires_grad_(True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = ms_deform_attn_3d(v, levels, loc, weights)
        out.square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = int(torch.cuda.max_memory_allocated()) if cuda else None
    with torch.no_grad():
        diff = float((ms_deform_attn_3d(value, levels, loc, weights)
                      - ms_deform_attn_reference(value, levels, loc, weights)).abs().max())
    finite = bool(torch.isfinite(out).all()) and v.grad is not None and bool(torch.isfinite(v.grad).all())
    return {"levels": [list(s) for s in levels], "tokens": tokens, "batch": batch, "heads": heads,
            "head_dim": head_dim, "points": points, "fwd_bwd_s": statistics.median(times[1:]),
            "peak_memory_bytes": peak, "max_abs_diff": diff, "ok": finite and diff < 1e-4}


def check_predict(env: dict, row: dict, device: str, out_dir: str, log_file: str, tta: bool) -> dict:
    """``nnUNetv2_predict`` of the combined dataset's test images with the model of ``row`` and with its baseline
    (nnU-Net's default trainer at the same plans): outputs exist, have the inputs' geometry and known labels."""
    import numpy as np
    import SimpleITK as sitk

    from nnunet_plugins.runner import console_command, run_step
    from nnunet_plugins.trainer_check import CONFIGURATION, DATASET_ID, DATASET_NAME

    images = os.path.join(env["nnUNet_raw"], DATASET_NAME, "imagesTs")
    labels = set(range(len(json.load(open(os.path.join(env["nnUNet_raw"], DATASET_NAME, "dataset.json")))["labels"])))
    cases = sorted(f[:-len("_0000.nii.gz")] for f in os.listdir(images) if f.endswith("_0000.nii.gz"))
    seconds, ok = {}, True
    for which, trainer, plans in (("model", row["trainer"], row["plans"]),
                                  ("baseline", row["baseline"]["trainer"], row["baseline"]["plans"])):
        out = os.path.join(out_dir, f"predict_{which}")
        cmd = console_command("nnUNetv2_predict") + ["-i", images, "-o", out, "-d", str(DATASET_ID), "-c",
                                                     CONFIGURATION, "-f", "0", "-tr", trainer, "-p", plans, "-device",
                                                     device, "--disable_progress_bar"]
        # CPU (the tests): no test-time mirroring and no worker processes, which take longer to start than the
        # tiny cases take to predict; CUDA: nnU-Net's defaults, as a user runs it
        cmd += [] if tta else ["--disable_tta", "-npp", "0", "-nps", "0"]
        t0 = time.perf_counter()
        run_step(cmd, env, log_file, echo=False)
        seconds[which] = time.perf_counter() - t0
        for case in cases:
            pred = sitk.ReadImage(os.path.join(out, case + ".nii.gz"))
            ref = sitk.ReadImage(os.path.join(images, case + "_0000.nii.gz"))
            ok &= pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing(), rtol=1e-5) \
                and np.allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-3) \
                and set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= labels
    return {"trainer": row["trainer"], "plans": row["plans"], "cases": len(cases), "seconds": seconds["model"],
            "baseline_seconds": seconds["baseline"], "ratio": seconds["model"] / seconds["baseline"], "ok": bool(ok)}


# CoTr's DeTrans levels at the official 48x192x192 patch (strides 4x8x8 and 8x16x16) and a CPU-test size
OFFICIAL_ATTENTION_LEVELS = ((12, 24, 24), (6, 12, 12))
TINY_ATTENTION_LEVELS = ((4, 8, 8), (2, 4, 4))


def run(out_dir: str, device: str = "cuda", size: str | None = None, steps: int | None = None, trainers=None,
        budget_s: float = 330.0, work_dir: str | None = None, predict_trainer: str = "CoTrTrainer") -> dict:
    """The node-side check (see the module docstring); returns the results written to ``out_dir``."""
    start = time.time()
    size = size or ("official" if device == "cuda" else "tiny")
    steps = steps or (8 if device == "cuda" else 4)
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    own_work = work_dir is None
    work_dir = os.path.abspath(work_dir or tempfile.mkdtemp(prefix="nnunet_plugins_device_check-"))
    log_file = os.path.join(out_dir, "device_check_log.txt")
    console = sys.__stdout__

    def say(msg):
        print(msg, file=console, flush=True)

    from nnunet_plugins import trainer_check as tc

    env = tc.setup_environment(work_dir, threads=1 if device == "cuda" else 2)
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceCheckError("--device cuda but torch.cuda.is_available() is False on this machine")
    results = {"device": device, "amp": device == "cuda", "size": size, "steps": steps,
               "environment": environment_info(device), "trainers": [], "ok": False}
    say(f"device check: {device}, {size} sizes, {steps} steps per trainer, log {log_file}")
    try:
        with open(log_file, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            pre = tc.prepare_dataset(env, shape=(32, 96, 96) if size == "official" else (16, 40, 40),
                                     log_file=log_file)
            results["trainers"] = tc.compare_trainers(pre, device, size, steps, trainers, tta=device == "cuda",
                                                      deadline=start + budget_s, log=say)
            row = next((r for r in results["trainers"] if r["trainer"] == predict_trainer and "baseline" in r), None)
            if row is not None:
                try:
                    results["predict"] = check_predict(env, row, device, work_dir, log_file, tta=device == "cuda")
                except Exception as e:
                    results["predict"] = {"trainer": predict_trainer, "ok": False, "error": str(e).splitlines()[0]}
                say(f"nnUNetv2_predict: {results['predict']}")
            try:
                levels = OFFICIAL_ATTENTION_LEVELS if size == "official" else TINY_ATTENTION_LEVELS
                results["deformable_attention"] = check_deformable_attention(device, levels)
            except Exception as e:
                results["deformable_attention"] = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
            say(f"deformable attention: {results['deformable_attention']}")
    finally:
        checks = results["trainers"] + [results[k] for k in ("predict", "deformable_attention") if k in results]
        results["ok"] = bool(results["trainers"]) and all(c.get("ok") for c in checks)
        results["elapsed_s"] = time.time() - start
        json_file, md_file = write_results(out_dir, results)
        say(open(md_file).read())
        say(f"written: {json_file}, {md_file}")
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnunet_plugins.device_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="download the wheels for an offline x86-64 CPython 3.12 node")
    pp.add_argument("--dest", default=os.path.join(REPO_ROOT, ".device_wheels"))
    pp.add_argument("--budget-mib", type=float, default=DEFAULT_BUDGET_BYTES / MIB)
    pv = sub.add_parser("verify", help="check a wheel folder against its manifest; print the wheel paths")
    pv.add_argument("folder")
    pr = sub.add_parser("run", help="run the check (after the wheels are installed)")
    pr.add_argument("out_dir")
    pr.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    pr.add_argument("--size", choices=("official", "tiny"), default=None,
                    help="patches and widths (default: official on cuda, tiny on cpu)")
    pr.add_argument("--steps", type=int, default=None, help="training steps per trainer (default 8 cuda, 4 cpu)")
    pr.add_argument("--trainers", nargs="+", default=None, help="default: every trainer in the registry")
    pr.add_argument("--budget-s", type=float, default=330.0,
                    help="trainers not started by then are reported as skipped (default 330 s: prediction and the "
                         "attention check still fit in 8 minutes)")
    pr.add_argument("--work-dir", default=None, help="keep the data and models here (default: a removed temp folder)")
    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.dest, budget_bytes=int(args.budget_mib * MIB))
            return 0
        if args.command == "verify":
            print("\n".join(verify_wheels(args.folder)))
            return 0
        results = run(args.out_dir, args.device, args.size, args.steps, args.trainers, args.budget_s, args.work_dir)
        return 0 if results["ok"] else 1
    except DeviceCheckError as e:
        print(f"device_check: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
