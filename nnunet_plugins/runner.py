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
