"""Conversion time of each challenge vs a plain SimpleITK read + write of the same files, in the same process.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_conversion.py [--cases 4] [--shape 48 160 160] [--repeats 3]

For each challenge a synthetic release (``nnunet_plugins.dataset_conversion.synthetic_releases``) is written; the
conversion (one process, no progress bar, ``--overwrite`` each time) is timed against reading every source file the
conversion reads with ``SimpleITK.ReadImage`` and writing it compressed with ``SimpleITK.WriteImage``. Both run
interleaved, best of ``--repeats``; the ratio conversion / baseline is printed (target: at most 1.2). The conversion
decodes every file completely once (gzip stream, NIfTI data length) and copies the bytes it decoded, so it
decompresses each file once and compresses only the files it must rewrite.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nnunet_plugins.dataset_conversion import challenges  # noqa: E402
from nnunet_plugins.dataset_conversion import synthetic_releases as synth  # noqa: E402


def sources_of(spec, release: str, raw: str, options: dict) -> list:
    """The files the conversion reads (its jobs' sources), captured from one conversion."""
    import nnunet_plugins.dataset_conversion.common as common
    module = sys.modules[spec.convert.__module__]
    captured = []
    original = module.build_dataset

    def capture(raw_root, dataset_id, name, jobs, *args, **kwargs):
        captured.extend(p for j in jobs for p in j.sources)
        return original(raw_root, dataset_id, name, jobs, *args, **kwargs)

    module.build_dataset = capture
    try:
        spec.convert(release, raw=raw, progress=False, overwrite=True, **options)
    finally:
        module.build_dataset = original
    assert common is not None
    return captured


def baseline(files: list, out_dir: str) -> None:
    import SimpleITK as sitk
    for i, f in enumerate(files):
        sitk.WriteImage(sitk.ReadImage(f), os.path.join(out_dir, f"{i}_{os.path.basename(f)}"), True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 160, 160))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    work = tempfile.mkdtemp(prefix="bench_conversion_")
    try:
        print(f"{'challenge':<12}{'files':>7}{'MB':>8}{'convert s':>11}{'sitk r+w s':>12}{'ratio':>8}")
        for name, spec in challenges().items():
            shape = tuple(args.shape) if name != "myops2020" else (max(2, args.shape[0] // 8),) + tuple(args.shape[1:])
            release = synth.generate(name, os.path.join(work, name), cases=args.cases, shape=shape)
            raw = os.path.join(work, f"raw_{name}")
            files = sources_of(spec, release, raw, {})
            size = sum(os.path.getsize(f) for f in files) / 1e6
            t_convert, t_base = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                spec.convert(release, raw=raw, progress=False, overwrite=True)
                t_convert.append(time.perf_counter() - t0)
                out = tempfile.mkdtemp(dir=work)
                t0 = time.perf_counter()
                baseline(files, out)
                t_base.append(time.perf_counter() - t0)
                shutil.rmtree(out)
            c, b = min(t_convert), min(t_base)
            print(f"{name:<12}{len(files):>7}{size:>8.1f}{c:>11.3f}{b:>12.3f}{c / b:>8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
