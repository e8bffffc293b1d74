"""nnU-Net's own multi-GPU (DDP) training, run on CPU with the gloo backend: a test harness.

``nnUNetv2_train ... -num_gpus N`` spawns N processes that each call ``nnunetv2.run.run_training.run_ddp``:
``init_process_group('nccl')``, ``torch.cuda.set_device(rank)``, the trainer made by ``get_trainer_from_args``
(whose ``__init__`` sees the initialised process group: ``is_ddp``, ``local_rank``, a per-rank share of the
batch size and oversampling), ``maybe_load_checkpoint`` (``--c``), ``run_training`` (network wrapped in
``DistributedDataParallel``, losses gathered, checkpoints and logs written by rank 0, barriers) and the final
validation split over the ranks. ``train_ddp`` runs exactly that function in N spawned processes and replaces
only what needs CUDA:

* the process group uses gloo instead of NCCL (with a timeout, so a collective that one rank never reaches
  fails instead of hanging);
* ``torch.cuda.set_device`` does nothing;
* the trainer's device: nnU-Net's ``__init__`` sets ``cuda:<rank>`` whenever DDP is on; right after it the
  device becomes ``cpu`` and the CUDA GradScaler is dropped (what ``-device cpu`` gives without DDP);
* ``DistributedDataParallel`` gets ``device_ids=None`` (required for CPU modules); any other argument
  (``find_unused_parameters`` from ``PluginTrainer``) passes through.

Each rank writes ``run<i>_rank<r>.json`` into ``report_dir`` for each run: a hash of its final network state
(parameters and buffers), the ``torch.save`` calls it made (which rank writes checkpoints), and per training
step the case keys and, for multi-task trainers, the task ids of its batch. Nothing of a trainer's training is
changed: the records come from wrapping the trainer object's public ``train_step`` and ``torch.save``; a run
may skip nnU-Net's final validation (``validate=False``) to save the worker processes it starts.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import time

COLLECTIVE_TIMEOUT_S = int(os.environ.get("NNUNET_PLUGINS_DDP_TIMEOUT", "120"))


def _patch_for_cpu(records: dict) -> None:
    """Replace the CUDA-only pieces of nnU-Net's DDP path in THIS process (see the module docstring)."""
    import torch
    import torch.distributed as dist
    from nnunetv2.run import run_training
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    def setup_ddp(rank, world_size):
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))

    run_training.setup_ddp = setup_ddp
    torch.cuda.set_device = lambda *args, **kwargs: None

    original_init = trainer_module.nnUNetTrainer.__init__

    @functools.wraps(original_init)
    def init_on_cpu(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            self.device = torch.device("cpu")
            self.grad_scaler = None

    trainer_module.nnUNetTrainer.__init__ = init_on_cpu

    real_ddp = trainer_module.DDP

    def ddp_on_cpu(module, *args, device_ids=None, **kwargs):
        on_cpu = all(p.device.type == "cpu" for p in module.parameters())
        return real_ddp(module, *args, device_ids=None if on_cpu else device_ids, **kwargs)

    trainer_module.DDP = ddp_on_cpu

    # record the trainer nnU-Net makes, and every step's batch, through the trainer's public methods
    original_get_trainer = run_training.get_trainer_from_args

    def get_trainer_recorded(*args, **kwargs):
        trainer = original_get_trainer(*args, **kwargs)
        records["trainer"] = trainer
        train_step = trainer.train_step

        def recorded_step(batch):
            task = batch.get("task_id")
            records["steps"].append({"keys": [str(k) for k in batch.get("keys", [])],
                                     "task_ids": None if task is None else [int(t) for t in task]})
            return train_step(batch)

        trainer.train_step = recorded_step
        if not records["validation"]:
            trainer.perform_actual_validation = lambda *a, **k: None
        return trainer

    run_training.get_trainer_from_args = get_trainer_recorded

    real_save = torch.save

    def save_recorded(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            records["saved"].append(os.path.basename(os.fspath(f)))
        return real_save(obj, f, *args, **kwargs)

    torch.save = save_recorded


def dict_hash(state: dict) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state dict (parameters and buffers)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            t = t.float()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, world_size: int, dataset: str, configuration: str, fold, runs: list, ports: list,
            report_dir: str) -> None:
    import torch
    from nnunetv2.run import run_training

    torch.set_num_threads(1)
    records = {}
    _patch_for_cpu(records)
    # one process per rank for all runs: starting a process (torch, nnU-Net imports) costs more than a tiny run
    for index, (run, port) in enumerate(zip(runs, ports)):
        records.clear()
        records.update(steps=[], saved=[], validation=run.get("validate", True))
        os.environ["MASTER_PORT"] = str(port)
        os.environ.update(run.get("env", {}))
        if run.get("seed") is not None:
            # reproducible runs: numpy drives nnU-Net's case sampling, cropping and augmentation (and the
            # multi-task sampler); each rank its own stream, as with nnU-Net's unseeded processes
            import random

            import numpy as np

            np.random.seed(int(run["seed"]) + rank)
            random.seed(int(run["seed"]) + rank)
            torch.manual_seed(int(run["seed"]))
        run_training.run_ddp(rank, dataset, configuration, fold, run["trainer"], run["plans"], False,
                             bool(run.get("continue_training")), False, None, False, False, world_size)
        tr = records["trainer"]
        network = tr.network.module if hasattr(tr.network, "module") else tr.network
        report = {"rank": rank, "trainer": run["trainer"], "is_ddp": bool(tr.is_ddp), "device": str(tr.device),
                  "batch_size": int(tr.batch_size), "state_hash": dict_hash(network.state_dict()),
                  "current_epoch": int(tr.current_epoch), "steps": records["steps"], "saved": records["saved"],
                  "output_folder": tr.output_folder, "network_class": type(network).__name__}
        with open(os.path.join(report_dir, f"run{index}_rank{rank}.json"), "w") as f:
            json.dump(report, f, indent=1)
        del tr, network
        records.clear()


@contextlib.contextmanager
def _environment(env: dict | None):
    saved = dict(os.environ)
    if env:
        os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def train_ddp(dataset: str | int, configuration: str, fold, runs: list, report_dir: str, *, world_size: int = 2,
              env: dict | None = None, timeout_s: float = 600.0) -> list[list[dict]]:
    """Run ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS -num_gpus WORLD_SIZE [--c]`` on CPU,
    once per entry of ``runs``, one after the other in the same ``world_size`` processes.

    ``runs``: dicts with ``trainer``, ``plans``, optional ``continue_training`` (``--c``), ``seed`` (numpy and
    random seeded with seed + rank, torch with seed: reproducible batches), ``validate`` (False
    skips nnU-Net's final validation, which starts worker processes: seconds each on a small CPU) and ``env``
    (variables set for that run, e.g. NNUNET_PLUGINS_EPOCHS). ``env``: the processes' environment on top of this
    one (nnUNet_* folders). Returns per run the ranks' reports (see the module docstring). Raises
    ``TimeoutError`` when the ranks do not finish within ``timeout_s`` (a rank stuck in a collective), and
    re-raises a rank's exception otherwise.
    """
    import torch.multiprocessing as mp
    from nnunetv2.run.run_training import find_free_network_port

    os.makedirs(report_dir, exist_ok=True)
    for f in os.listdir(report_dir):
        if f.startswith("run") and f.endswith(".json"):
            os.remove(os.path.join(report_dir, f))
    ports = []
    while len(ports) < len(runs):
        port = find_free_network_port()
        if port not in ports:
            ports.append(port)
    run_env = dict(env or {})
    run_env.setdefault("MASTER_ADDR", "localhost")
    with _environment(run_env):
        ctx = mp.start_processes(_worker, args=(world_size, str(dataset), configuration, fold, list(runs), ports,
                                                report_dir),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.time() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.time() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"DDP training ({world_size} CPU processes, runs {[r['trainer'] for r in runs]}) did "
                               f"not finish within {timeout_s:.0f} s: a rank is probably waiting in a collective "
                               f"that the others skipped")
    return [[json.load(open(os.path.join(report_dir, f"run{i}_rank{r}.json"))) for r in range(world_size)]
            for i in range(len(runs))]
