"""Shared parts of the challenge evaluators: overlap metrics, the parallel per-case runner, result tables."""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from typing import Sequence

import numpy as np

from nnunet_plugins.dataset_conversion.common import (DEFAULT_GEOMETRY_TOLERANCE, ChallengeError, IncompleteError,
                                                      check_extra, check_geometry, prepare_output_folder, run_parallel,
                                                      write_json, write_text)

#: what ``evaluate`` does with reference cases that have no prediction (``--missing``)
MISSING_RULES = ("error", "empty", "skip")


def dice(mask_a: np.ndarray, mask_b: np.ndarray, both_empty: float = 1.0) -> float:
    """2|A and B| / (|A| + |B|); ``both_empty`` when both masks are empty (challenges differ here)."""
    a = np.asarray(mask_a, dtype=bool)
    b = np.asarray(mask_b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return float(both_empty)
    return 2.0 * int(np.logical_and(a, b).sum()) / total


@contextmanager
def opened_predictions(path: str):
    """Yield a folder with the predictions: ``path`` itself, or a zip archive extracted to a temporary folder."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        tmp = tempfile.mkdtemp(prefix="nnunet_plugins_eval_")
        try:
            with zipfile.ZipFile(path) as z:
                for member in z.namelist():
                    target = os.path.realpath(os.path.join(tmp, member))
                    if not target.startswith(os.path.realpath(tmp) + os.sep):
                        raise ChallengeError(f"{path}: archive member {member!r} points outside the archive")
                z.extractall(tmp)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.isdir(path):
        yield path
    else:
        raise ChallengeError(f"predictions not found (need a folder or a .zip): {path}")


def unwrap(folder: str, accept) -> str:
    """Descend through single wrapper folders (e.g. a zip's ``results/``) until ``accept(folder)`` holds."""
    while not accept(folder):
        entries = [e for e in os.listdir(folder) if not e.startswith(".") and e != "__MACOSX"]
        if len(entries) == 1 and os.path.isdir(os.path.join(folder, entries[0])):
            folder = os.path.join(folder, entries[0])
        else:
            break
    return folder


def match_cases(references: dict, predictions: dict, where: str, missing: str = "error",
                allow_extra: bool = False) -> tuple[list, dict]:
    """Pair reference cases with predictions: ([(case, prediction or None), ...] in reference order, notes).

    A prediction that matches no reference is an error unless ``allow_extra`` (the rule of ``export``). A reference
    case without a prediction is an error listing every such case (``missing='error'``, the default: the challenges
    score a missing case as worst), is scored as an empty prediction (``'empty'``), or is left out with a note
    (``'skip'``, e.g. for the predictions of one cross-validation fold); never silently.
    """
    if missing not in MISSING_RULES:
        raise ChallengeError(f"missing must be one of {', '.join(MISSING_RULES)}, got {missing!r}")
    if not predictions:
        raise ChallengeError(f"no predictions in {where}")
    extra = check_extra(predictions, references, "reference case", where, allow_extra)
    absent = sorted(set(references) - set(predictions))
    notes = {"extra_predictions": extra, "missing_predictions": absent, "missing_rule": missing}
    if absent and missing == "error":
        raise IncompleteError("prediction(s) of reference cases", absent, where,
                              " (pass --missing empty to score them as empty predictions, or --missing skip to "
                              "leave them out)")
    if absent:
        what = "scored as empty predictions" if missing == "empty" else "left out of the evaluation"
        print(f"note: {len(absent)} reference case(s) have no prediction in {where} and are {what}: "
              f"{', '.join(absent)}")
    pairs = [(c, predictions.get(c)) for c in references if c in predictions or missing == "empty"]
    return pairs, notes


def check_prediction_geometry(case: str, reference_path: str, reference, prediction_path: str, prediction,
                              ignore_geometry: bool = False) -> None:
    """The geometry rule of ``evaluate``: the prediction must have the reference's geometry, checked as ``export``
    checks it (same tolerance, same message) unless ``ignore_geometry`` (where the official code ignores it)."""
    if not ignore_geometry:
        check_geometry(case, reference_path, reference.three_d(), prediction_path, prediction.three_d(),
                       DEFAULT_GEOMETRY_TOLERANCE, "prediction", "reference")


def output_folder(out_dir: str | None, pred: str) -> str:
    """``-o`` or the prediction folder (for a zip: its folder), checked to be writable before any work."""
    default = pred if os.path.isdir(pred) else os.path.dirname(os.path.abspath(pred))
    return prepare_output_folder(out_dir or default, "output folder")


def run_evaluation(name: str, title: str, function, items: Sequence[tuple[str, dict]], metrics: Sequence[str],
                   structures: Sequence[str], out_dir: str, meta: dict, num_processes: int, progress: bool,
                   verbose: bool, group_by: str | None = None, extra_lines: Sequence[str] = ()) -> dict:
    """The shared tail of every evaluator: score ``items`` with ``function`` in parallel, summarise, write the
    tables (``<name>_per_case.csv``, ``<name>_summary.csv``, ``<name>_evaluation.json``) and print the summary."""
    rows = run_cases(function, items, num_processes, f"evaluating {title}", progress)
    summary = summarize(rows, metrics, structures, group_by)
    paths = write_results(name, rows, summary, out_dir, meta)
    if verbose:
        print(format_summary(title, summary, metrics, structures))
        for line in extra_lines:
            print(line)
        print(f"tables: {paths['per_case_csv']}, {paths['summary_csv']}, {paths['json']}")
    return {"rows": rows, "summary": summary, "files": paths, **meta}


def run_cases(function, items: Sequence[tuple[str, dict]], num_processes: int, desc: str,
              progress: bool = True) -> list[dict]:
    """Evaluate cases in parallel; each call returns a list of row dicts. Rows come back in ``items`` order."""
    results = run_parallel(function, items, num_processes, desc=desc, progress=progress)
    rows = []
    for key, _ in items:
        rows.extend(results[key])
    return rows


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(rows: list[dict], metrics: Sequence[str], structures: Sequence[str], group_by: str | None = None) \
        -> dict:
    """Means over cases of every ``metric_structure`` column (nan entries skipped, their number reported), and
    each metric's mean over structures; separately per value of ``group_by`` if given."""
    groups = {}
    for r in rows:
        groups.setdefault(r.get(group_by) if group_by else "all", []).append(r)
    summary = {}
    for g, grows in groups.items():
        per_column, nan_counts = {}, {}
        for m in metrics:
            for s in structures:
                col = f"{m}_{s}"
                values = [r[col] for r in grows if col in r]
                per_column[col] = _mean(values)
                n_nan = sum(1 for v in values if v is None or (isinstance(v, float) and math.isnan(v)))
                if n_nan:
                    nan_counts[col] = n_nan
        over_structures = {m: _mean([per_column[f"{m}_{s}"] for s in structures]) for m in metrics}
        summary[g] = {"num_cases": len(grows), "mean": per_column, "mean_over_structures": over_structures}
        if nan_counts:
            summary[g]["nan_cases"] = nan_counts
    return summary


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.8f}")
    return str(v)


def rows_to_csv(rows: list[dict]) -> str:
    columns = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c, "")) for c in columns])
    return buf.getvalue()


def write_results(challenge: str, rows: list[dict], summary: dict, out_dir: str, meta: dict) -> dict:
    """Write ``<challenge>_per_case.csv``, ``<challenge>_summary.csv`` and ``<challenge>_evaluation.json``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"per_case_csv": os.path.join(out_dir, f"{challenge}_per_case.csv"),
             "summary_csv": os.path.join(out_dir, f"{challenge}_summary.csv"),
             "json": os.path.join(out_dir, f"{challenge}_evaluation.json")}
    write_text(rows_to_csv(rows), paths["per_case_csv"])
    summary_rows = []
    for group, s in summary.items():
        row = {"group": group, "num_cases": s["num_cases"]}
        row.update(s["mean"])
        row.update({f"{m}_mean_over_structures": v for m, v in s["mean_over_structures"].items()})
        summary_rows.append(row)
    write_text(rows_to_csv(summary_rows), paths["summary_csv"])

    def clean(o):
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return str(o)
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    write_json(clean({"challenge": challenge, **meta, "summary": summary, "per_case": rows}), paths["json"])
    return paths


def format_summary(challenge: str, summary: dict, metrics: Sequence[str], structures: Sequence[str]) -> str:
    lines = []
    for group, s in summary.items():
        title = f"{challenge}: {s['num_cases']} cases" + ("" if group == "all" else f" (reference: {group})")
        lines.append(title)
        width = max(len(x) for x in structures) + 2
        lines.append(" " * width + "".join(f"{m:>12}" for m in metrics))
        for st in structures:
            lines.append(f"{st:<{width}}" + "".join(f"{_fmt_short(s['mean'][f'{m}_{st}']):>12}" for m in metrics))
        lines.append(f"{'mean':<{width}}" + "".join(f"{_fmt_short(s['mean_over_structures'][m]):>12}"
                                                  for m in metrics))
        for col, n in s.get("nan_cases", {}).items():
            lines.append(f"  note: {col} undefined (nan) in {n} case(s), left out of its mean")
    return "\n".join(lines)


def _fmt_short(v) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"
