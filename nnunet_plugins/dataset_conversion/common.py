"""Shared machinery of the challenge converters, exporters and evaluators.

* errors that name the case and file (all subclasses of ``ValueError``, so ``nnunet-plugins`` reports them
  as one clean line);
* header-only geometry reading and comparison for SimpleITK- and nibabel-read files;
* atomic output (``nnunet_plugins.atomic``: a temporary file in the destination folder, then ``os.replace``);
* a process pool with a progress bar that collects every failing case instead of stopping at the first;
* :func:`build_dataset`: writes ``nnUNet_raw/DatasetXXX_Name`` inside a hidden ``.DatasetXXX_Name.partial``
  folder, resumes an interrupted run there (finished cases are skipped), writes ``dataset.json`` last and
  renames the folder into place, so nnU-Net never sees a half-written dataset;
* submission helpers: completeness check and zip archives.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from nnunet_plugins.atomic import TMP_PREFIX, atomic_output, write_json  # noqa: F401  (re-exported)

DEFAULT_GEOMETRY_TOLERANCE = 1e-4   # mm for spacing and origin, unitless for direction cosines


# ------------------------------------------------------------------------------------------------ errors

class ChallengeError(ValueError):
    """A user-facing error of the challenge tools."""


class ReleaseLayoutError(ChallengeError):
    """The given folder is not laid out as this challenge releases its data."""


class CaseError(ChallengeError):
    """Something is wrong with one case; the message names the case and the file."""

    def __init__(self, case: str, path: str | None, problem: str):
        self.case, self.path, self.problem = case, path, problem
        where = f"case {case}" + (f", file {path}" if path else "")
        super().__init__(f"{where}: {problem}")


class IncompleteError(ChallengeError):
    """Expected cases are missing."""

    def __init__(self, what: str, missing: Sequence[str], where: str):
        self.missing = list(missing)
        listing = ", ".join(self.missing)
        super().__init__(f"{len(self.missing)} {what} missing in {where}: {listing}")


# ------------------------------------------------------------------------------------------------ reading

def require_file(case: str, path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise CaseError(case, path, f"missing {what}")
    return path


def _sitk():
    import SimpleITK as sitk
    return sitk


def read_sitk(case: str, path: str):
    """Read an image with SimpleITK; a missing or unreadable file raises CaseError."""
    require_file(case, path, "file")
    sitk = _sitk()
    try:
        return sitk.ReadImage(path)
    except Exception as e:  # SimpleITK raises RuntimeError with a long ITK message
        raise CaseError(case, path, f"cannot read image ({str(e).strip().splitlines()[-1][:200]})") from None


def read_nifti(case: str, path: str):
    """Load a NIfTI header with nibabel (data stays on disk); errors raise CaseError."""
    require_file(case, path, "file")
    import nibabel
    try:
        img = nibabel.load(path)
        if len(img.shape) != 3:
            raise ValueError(f"expected a 3-D image, got shape {img.shape}")
        return img
    except Exception as e:
        raise CaseError(case, path, f"cannot read NIfTI ({e})") from None


def nifti_array(case: str, path: str, img=None) -> np.ndarray:
    img = img if img is not None else read_nifti(case, path)
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:
        raise CaseError(case, path, f"cannot read the voxel data ({e})") from None


@dataclass(frozen=True)
class Geometry:
    """SimpleITK geometry: size (x, y, z), spacing, origin, direction (row-major 3x3)."""
    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of(cls, image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @classmethod
    def read(cls, case: str, path: str) -> "Geometry":
        """Header-only read."""
        require_file(case, path, "file")
        sitk = _sitk()
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except Exception as e:
            raise CaseError(case, path, f"cannot read image ({str(e).strip().splitlines()[-1][:200]})") from None
        return cls(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                   tuple(reader.GetDirection()))

    def differences(self, other: "Geometry", tolerance: float) -> list[str]:
        if self.size != other.size:
            return [f"size {other.size} != {self.size}"]
        out = []
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=tolerance):
                out.append(f"{name} {tuple(np.round(b, 6))} != {tuple(np.round(a, 6))}")
        return out

    def nnunet_equal(self, other: "Geometry") -> bool:
        """Equal as nnU-Net's readers compare geometry (numpy allclose with default tolerances)."""
        return self.size == other.size and all(
            np.allclose(getattr(self, n), getattr(other, n)) for n in ("spacing", "origin", "direction"))

    def apply(self, image):
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def check_geometry(case: str, reference_path: str, reference: Geometry, path: str, geometry: Geometry,
                   tolerance: float) -> None:
    diffs = reference.differences(geometry, tolerance)
    if diffs:
        raise CaseError(case, path, "geometry differs from " + os.path.basename(reference_path) + ": "
                        + "; ".join(diffs))


def check_affine(case: str, reference_path: str, ref_img, path: str, img, tolerance: float) -> None:
    if tuple(ref_img.shape) != tuple(img.shape):
        raise CaseError(case, path, f"shape {tuple(img.shape)} differs from {tuple(ref_img.shape)} of "
                                    f"{os.path.basename(reference_path)}")
    if not np.allclose(ref_img.affine, img.affine, rtol=0, atol=tolerance):
        raise CaseError(case, path, "affine differs from " + os.path.basename(reference_path) + ":\n"
                        + np.array2string(img.affine, precision=5) + "\n!=\n"
                        + np.array2string(ref_img.affine, precision=5))


def unique_values(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values (bincount for small non-negative integers: much faster than np.unique)."""
    arr = np.asarray(arr)
    if arr.size == 0:
        return np.zeros(0, dtype=arr.dtype)
    if arr.dtype.kind in "ui" or arr.dtype == bool:
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi < (1 << 16):
            return np.flatnonzero(np.bincount(arr.ravel().astype(np.int64, copy=False), minlength=hi + 1))
    return np.unique(arr)


def check_label_values(case: str, path: str, arr: np.ndarray, allowed: Iterable[int]) -> np.ndarray:
    """Return the distinct values of ``arr``; CaseError if any is not an integer in ``allowed``."""
    values = unique_values(arr)
    allowed = set(int(a) for a in allowed)
    bad = [v for v in values.tolist() if not float(v).is_integer() or int(v) not in allowed]
    if bad:
        shown = ", ".join(str(b) for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise CaseError(case, path, f"label values {shown} are not in this challenge's set {sorted(allowed)}")
    return values.astype(np.int64)


# ------------------------------------------------------------------------------------------------ writing

def atomic_copy(src: str, dst: str) -> None:
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_sitk(image, dst: str, compress: bool = True) -> None:
    sitk = _sitk()
    with atomic_output(dst) as tmp:
        sitk.WriteImage(image, tmp, compress)


def write_nifti(img, dst: str) -> None:
    import nibabel
    with atomic_output(dst) as tmp:
        nibabel.save(img, tmp)


def write_text(text: str, dst: str) -> None:
    with atomic_output(dst) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def remove_temporaries(folder: str) -> None:
    """Delete temporary files left by an interrupted run anywhere below ``folder``."""
    for root, _, files in os.walk(folder):
        for f in files:
            if f.startswith(TMP_PREFIX):
                os.remove(os.path.join(root, f))


def write_like(case: str, reference: str, array: np.ndarray, out_path: str, dtype=np.uint8,
               order: str = "sitk") -> str:
    """Write ``array`` (SimpleITK axis order (z, y, x), or nibabel order with ``order='nibabel'``) as an image with
    exactly the geometry of the image file ``reference``.

    NIfTI geometry does not survive a read/write cycle through a direction matrix bit for bit (the quaternion is
    recomputed), so for a NIfTI reference the output takes a copy of the reference's header (qform, sform, pixdim)
    with the new data type and no intensity scaling; other formats copy the SimpleITK geometry, which they store
    exactly.
    """
    array = np.asarray(array).astype(dtype, copy=False)
    if reference.endswith((".nii", ".nii.gz")):
        import nibabel
        ref = read_nifti(case, reference)
        data = array if order == "nibabel" else np.ascontiguousarray(array.transpose(2, 1, 0))
        if tuple(data.shape) != tuple(ref.shape):
            raise CaseError(case, out_path, f"array shape {data.shape} does not match {reference} {tuple(ref.shape)}")
        header = ref.header.copy()
        header.set_data_dtype(dtype)
        header.set_slope_inter(None, None)
        write_nifti(nibabel.Nifti1Image(data, None, header=header), out_path)
    else:
        sitk = _sitk()
        ref = read_sitk(case, reference)
        data = array if order == "sitk" else np.ascontiguousarray(array.transpose(2, 1, 0))
        out = sitk.GetImageFromArray(data)
        if out.GetSize() != ref.GetSize():
            raise CaseError(case, out_path, f"array shape {data.shape} does not match {reference}")
        out.CopyInformation(ref)
        write_sitk(out, out_path)
    return out_path


def image_from_array_like(array: np.ndarray, geometry: Geometry):
    sitk = _sitk()
    return geometry.apply(sitk.GetImageFromArray(array))


def place_sitk_file(case: str, src: str, dst: str, reference: Geometry | None = None,
                    tolerance: float = DEFAULT_GEOMETRY_TOLERANCE,
                    reference_path: str | None = None) -> None:
    """Copy ``src`` to ``dst`` byte for byte; if its geometry is within ``tolerance`` of ``reference`` but not
    equal as nnU-Net compares it, rewrite it with the reference geometry (voxels unchanged) instead."""
    if reference is None:
        atomic_copy(src, dst)
        return
    geometry = Geometry.read(case, src)
    check_geometry(case, reference_path or "the reference image", reference, src, geometry, tolerance)
    if geometry.nnunet_equal(reference):
        atomic_copy(src, dst)
    else:
        write_sitk(reference.apply(read_sitk(case, src)), dst)


def place_nifti_file(case: str, src: str, dst: str, reference=None, tolerance: float = DEFAULT_GEOMETRY_TOLERANCE,
                     reference_path: str | None = None) -> None:
    """nibabel counterpart of :func:`place_sitk_file` (the affine is the geometry)."""
    if reference is None:
        atomic_copy(src, dst)
        return
    img = read_nifti(case, src)
    check_affine(case, reference_path or "the reference image", reference, src, img, tolerance)
    if np.allclose(img.affine, reference.affine):
        atomic_copy(src, dst)
    else:
        import nibabel
        data = nifti_array(case, src, img)
        header = img.header.copy()
        write_nifti(nibabel.Nifti1Image(data, reference.affine, header), dst)


# ------------------------------------------------------------------------------------------------ parallel

def _resolve(dotted: str) -> Callable:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_init() -> None:
    # one ITK thread per worker process: the pool already uses the cores
    try:
        _sitk().ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except Exception:
        pass


def _call(item):
    key, dotted, kwargs = item
    try:
        return key, True, _resolve(dotted)(**kwargs)
    except ChallengeError as e:
        return key, False, str(e)
    except Exception as e:  # keep the pool alive and report every failure together
        return key, False, f"case {key}: {type(e).__name__}: {e}"


def run_parallel(dotted: str, items: Sequence[tuple[str, dict]], num_processes: int = 1,
                 desc: str = "", progress: bool = True) -> dict:
    """Call the function ``module:function`` with each ``kwargs`` of ``items`` = [(key, kwargs), ...], in
    ``num_processes`` processes, with a progress bar. Returns {key: result}; if any call fails, raises
    ChallengeError listing every failure (the others have completed)."""
    from tqdm import tqdm

    work = [(key, dotted, kwargs) for key, kwargs in items]
    results, failures = {}, []
    bar = tqdm(total=len(work), desc=desc, disable=not progress or not work, unit="case")
    try:
        if num_processes <= 1 or len(work) <= 1:
            for item in work:
                key, ok, value = _call(item)
                (results.__setitem__(key, value) if ok else failures.append(value))
                bar.update()
        else:
            import multiprocessing
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(num_processes, len(work)), initializer=_worker_init) as pool:
                for key, ok, value in pool.imap_unordered(_call, work):
                    (results.__setitem__(key, value) if ok else failures.append(value))
                    bar.update()
    finally:
        bar.close()
    if failures:
        failures.sort()
        raise ChallengeError(f"{len(failures)} of {len(work)} cases failed:\n  " + "\n  ".join(failures))
    return results


# ------------------------------------------------------------------------------------------------ datasets

def resolve_raw_root(raw: str | None) -> str:
    raw = raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise ChallengeError("no nnU-Net raw folder: pass --raw or set the nnUNet_raw environment variable")
    os.makedirs(raw, exist_ok=True)
    return os.path.abspath(raw)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ChallengeError(f"dataset ID must be in 1..999, got {dataset_id}")
    return f"Dataset{int(dataset_id):03d}_{name}"


@dataclass
class CaseJob:
    """Conversion of one case: ``function(dataset_dir=..., **kwargs)`` writes ``outputs`` (paths relative to
    the dataset folder, each written atomically)."""
    case: str
    function: str
    kwargs: dict
    outputs: list = field(default_factory=list)


def _job_done(folder: str, job: CaseJob) -> bool:
    return all(os.path.isfile(os.path.join(folder, o)) for o in job.outputs)


def _expected_files(jobs: Sequence[CaseJob]) -> set:
    return {o for j in jobs for o in j.outputs}


def _dataset_files(folder: str) -> set:
    found = set()
    for root, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), folder)
            if rel not in ("dataset.json", "conversion.json") and not f.startswith(TMP_PREFIX):
                found.add(rel)
    return found


def build_dataset(raw_root: str, dataset_id: int, name: str, jobs: Sequence[CaseJob], dataset_json: dict,
                  num_processes: int = 1, overwrite: bool = False, progress: bool = True) -> str:
    """Write the dataset ``raw_root/DatasetXXX_name`` from ``jobs``, atomically as a whole (see module doc).

    ``dataset_json['conversion']`` (the tool's options) identifies a run: a finished dataset with the same
    dataset.json is left as it is; a partial or finished one from other options needs ``overwrite``.
    """
    raw_root = resolve_raw_root(raw_root)
    dataset_json = json.loads(json.dumps(dataset_json))  # tuples -> lists, as it will read back
    folder_name = dataset_folder_name(dataset_id, name)
    final = os.path.join(raw_root, folder_name)
    partial = os.path.join(raw_root, f".{folder_name}.partial")
    prefix = f"Dataset{int(dataset_id):03d}_"
    clashes = [d for d in os.listdir(raw_root) if d.startswith(prefix) and d != folder_name]
    if clashes:
        raise ChallengeError(f"dataset ID {dataset_id} is already used by {', '.join(clashes)} in {raw_root}; "
                             "choose another ID with -d")
    if overwrite:
        for f in (final, partial):
            if os.path.isdir(f):
                shutil.rmtree(f)
    expected = _expected_files(jobs)
    if os.path.isdir(final):
        existing_json = None
        if os.path.isfile(os.path.join(final, "dataset.json")):
            with open(os.path.join(final, "dataset.json")) as f:
                existing_json = json.load(f)
        if existing_json == dataset_json and expected <= _dataset_files(final):
            print(f"{final} is complete and up to date; nothing to do (use --overwrite to convert again)")
            return final
        if existing_json is None or existing_json.get("conversion") != dataset_json.get("conversion"):
            raise ChallengeError(f"{final} exists and was not written by this conversion with these options; "
                                 "use --overwrite to replace it")
        if os.path.isdir(partial):
            shutil.rmtree(partial)
        os.replace(final, partial)  # resume the finished dataset as a partial one (e.g. the release grew)
    os.makedirs(partial, exist_ok=True)
    remove_temporaries(partial)
    marker = os.path.join(partial, "conversion.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            previous = json.load(f)
        if previous != dataset_json.get("conversion"):
            raise ChallengeError(f"an interrupted conversion with other options is in {partial}; "
                                 "use --overwrite to start clean")
    else:
        write_json(dataset_json.get("conversion"), marker)
    stale = _dataset_files(partial) - expected
    for rel in stale:  # files of cases that are no longer part of the release
        os.remove(os.path.join(partial, rel))
    todo = [j for j in jobs if not _job_done(partial, j)]
    if len(todo) < len(jobs):
        print(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} cases already converted")
    items = [(j.case, {"dataset_dir": partial, **j.kwargs}) for j in todo]
    by_function: dict = {}
    for j, item in zip(todo, items):
        by_function.setdefault(j.function, []).append(item)
    for function, group in by_function.items():
        run_parallel(function, group, num_processes, desc=f"converting {folder_name}", progress=progress)
    missing = sorted(expected - _dataset_files(partial))
    if missing:
        raise ChallengeError(f"conversion did not write {len(missing)} expected files, e.g. {missing[:3]}")
    write_json(dataset_json, os.path.join(partial, "dataset.json"))
    os.remove(marker)
    os.replace(partial, final)
    return final


# ------------------------------------------------------------------------------------------------ exports

def check_complete(expected: Iterable[str], available: Iterable[str], what: str, where: str) -> None:
    missing = sorted(set(expected) - set(available))
    if missing:
        raise IncompleteError(what, missing, where)


def write_zip(entries: Sequence[tuple[str, str]], zip_path: str) -> str:
    """Pack ``[(name in archive, file), ...]`` into ``zip_path`` (atomically). Already-compressed images are
    stored, not deflated again."""
    with atomic_output(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w") as z:
            for arcname, path in entries:
                compress = zipfile.ZIP_STORED if path.endswith((".gz", ".zip")) else zipfile.ZIP_DEFLATED
                z.write(path, arcname, compress_type=compress)
    return zip_path


def strip_ending(name: str, endings: Sequence[str] = (".nii.gz", ".nii", ".mha", ".nrrd")) -> str | None:
    for e in endings:
        if name.endswith(e):
            return name[:-len(e)]
    return None


def list_images(folder: str, endings: Sequence[str] = (".nii.gz", ".mha")) -> dict:
    """{name without ending: path} of the image files directly in ``folder`` (temporary files ignored)."""
    if not os.path.isdir(folder):
        raise ChallengeError(f"not a folder: {folder}")
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith(TMP_PREFIX) or f.startswith("."):
            continue
        stem = strip_ending(f, endings)
        if stem is not None and os.path.isfile(os.path.join(folder, f)):
            out[stem] = os.path.join(folder, f)
    return out
