"""Running nnU-Net's command-line programs from Python (demo, tests, pipelines)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time


def console_command(name: str) -> list[str]:
    """A console script of the running environment (found next to the interpreter, else on PATH)."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return [candidate] if os.path.exists(candidate) else [name]


def run_step(cmd: list[str], env: dict, log_file: str, echo: bool = True) -> None:
    """Run one command, append its output to ``log_file``; raise with the log's tail on failure."""
    line = " ".join(shlex.quote(c) for c in cmd)
    if echo:
        print("$ " + line, flush=True)
    start = time.time()
    with open(log_file, "a") as log:
        log.write("\n$ " + line + "\n")
        log.flush()
        result = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log_file) as log:
            tail = "".join(log.readlines()[-60:])
        raise RuntimeError(f"command failed with exit code {result.returncode}: {line}\n"
                           f"--- last lines of {log_file} ---\n{tail}")
    if echo:
        print(f"  done in {time.time() - start:.0f} s", flush=True)


def nnunet_cpu_env(root, augmentation_workers: int | None = 0, threads: int = 2, base: dict | None = None) -> dict:
    """Environment for nnU-Net's commands on an isolated folder tree under ``root`` (CPU settings).

    Sets nnUNet_raw / nnUNet_preprocessed / nnUNet_results under ``root`` (created), and the settings
    that keep small CPU runs fast on a 2-core machine:

    * ``nnUNet_n_proc_DA`` = ``augmentation_workers`` (0: augmentation in the training process, the
      fastest on 2 cores; ``None`` leaves it unset, which stock ``nnUNetv2_plan_and_preprocess`` needs
      because its planner crashes on 0);
    * ``nnUNet_def_n_proc=2`` (preprocessing memory), ``nnUNet_compile=0``, ``OMP_NUM_THREADS``;
    * ``OMP_WAIT_POLICY=PASSIVE``: ``nnUNetv2_train -device cpu`` calls
      ``torch.set_num_threads(cpu_count())`` whatever OMP_NUM_THREADS says, and when another process
      holds a core the spinning OpenMP threads make each step about 20x slower (measured: 11-13 s vs
      0.6 s per BA-Net step); sleeping waiters avoid that.

    This package's trainers are registered in the returned environment (as the installed .pth does).
    """
    from nnunet_plugins._autoregister import register

    env = dict(os.environ if base is None else base)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = os.path.join(os.fspath(root), name)
        os.makedirs(env[name], exist_ok=True)
    env.update(nnUNet_def_n_proc="2", nnUNet_compile="0", OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    if augmentation_workers is None:
        env.pop("nnUNet_n_proc_DA", None)
    else:
        env["nnUNet_n_proc_DA"] = str(augmentation_workers)
    register(env)
    return env
