"""Shared machinery of the challenge converters, exporters and evaluators.

* errors that name the case and file (all subclasses of ``ValueError``, so ``nnunet-plugins`` reports them
  as one clean line);
* :class:`Challenge` / :class:`Option`: what each challenge module declares (its convert / export / evaluate and
  the command-line options it adds to each sub-command); ``nnunet_plugins.dataset_conversion.challenges()`` is the
  table the commands loop over;
* complete reading: :func:`load_file` reads a file once and decodes all of it (a truncated or corrupt file is an
  error naming it; SimpleITK itself reads a truncated ``.nii.gz`` as zeros), the same bytes are then copied;
* geometry in one convention (SimpleITK's: x, y, z; spacing, origin, direction) for SimpleITK- and nibabel-read
  files, one message format for every geometry mismatch;
* atomic output (``nnunet_plugins.atomic``: a temporary file in the destination folder, then ``os.replace``) and
  removal of our own temporaries left by a killed run;
* a process pool with a progress bar that collects every failing case instead of stopping at the first;
* :func:`build_dataset`: writes ``nnUNet_raw/DatasetXXX_Name`` inside a hidden ``.DatasetXXX_Name.partial``
  folder, resumes an interrupted run there (finished cases are skipped), records what each case was converted
  from (size and modification time of every source file, by its path relative to the release folder), reconverts
  cases whose sources changed, removes (and names) cases no longer in the release, writes
  ``dataset.json`` last and renames the folder into place, so nnU-Net never sees a half-written dataset;
* submission helpers: completeness and extra-file checks, zip archives.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from nnunet_plugins.atomic import TMP_PREFIX, atomic_output, write_json  # noqa: F401  (re-exported)

DEFAULT_GEOMETRY_TOLERANCE = 1e-4   # mm for spacing and origin, unitless for direction cosines
#: our temporary files (``nnunet_plugins.atomic.atomic_output``): ``.tmp-<8 hex digits>-<final name>``
TMP_PATTERN = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]{8}-.")
#: per-case record of the source files in a converted dataset (not part of nnU-Net's format)
PROVENANCE_FILE = "conversion_sources.json"
AXES_NOTE = "x, y, z as SimpleITK reports them"


def default_num_processes() -> int:
    """nnU-Net's default worker count (``nnUNet_def_n_proc``, else 8), the default of every ``-np`` here."""
    from nnunetv2.configuration import default_num_processes as n
    return int(n)


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

    def __init__(self, what: str, missing: Sequence[str], where: str, hint: str = ""):
        self.missing = list(missing)
        listing = ", ".join(self.missing)
        super().__init__(f"{len(self.missing)} {what} missing in {where}: {listing}{hint}")


class ExtraError(ChallengeError):
    """Predictions that match no expected case."""

    def __init__(self, extra: Sequence[str], what: str, where: str):
        self.extra = list(extra)
        super().__init__(f"{len(self.extra)} prediction(s) in {where} match no {what}: {', '.join(self.extra)} "
                         "(pass --allow-extra to ignore them)")


# ------------------------------------------------------------------------------------------------ the table

@dataclass(frozen=True)
class Option:
    """A command-line option a challenge adds to one sub-command, and the keyword it fills.

    ``flags``: argparse flags; ``param``: keyword argument of the challenge's Python function; ``flag``: a switch
    (store_true); ``to_param``: turns the parsed value into the keyword's value (e.g. ``--no-round`` ->
    ``round_decimals=None``); ``const``: a switch that sets ``param`` to this value (several options may fill one
    keyword, e.g. ``--archive PATH`` and ``--no-archive``).
    """
    flags: tuple
    param: str
    help: str
    default: Any = None
    type: Callable | None = None
    choices: tuple | None = None
    flag: bool = False
    to_param: Callable | None = None
    const: Any = "<none>"
    required: bool = False
    metavar: str | None = None

    def add_to(self, parser) -> None:
        kwargs = {"help": self.help, "dest": self.param}
        if self.metavar:
            kwargs["metavar"] = self.metavar
        if self.required:
            kwargs["required"] = True
        if self.const != "<none>":
            kwargs.update(action="store_const", const=self.const)
        elif self.flag:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(default=self.default, type=self.type, choices=self.choices)
        parser.add_argument(*self.flags, **kwargs)

    def value(self, args):
        v = getattr(args, self.param)
        return self.to_param(v) if self.to_param is not None else v


def ignore_geometry_option(official: str) -> Option:
    """``evaluate --ignore-geometry`` for a challenge whose official code ignores geometry (``official``: how)."""
    return Option(("--ignore-geometry",), "ignore_geometry", "score predictions whose spacing/origin/direction differ "
                  f"from the reference, as the official code does ({official})", flag=True)


def archive_options(default_name: str) -> tuple:
    """``export --archive PATH`` / ``--no-archive``: both fill the keyword ``archive``."""
    return (Option(("--archive",), "archive", f"zip path (default: OUT_DIR/{default_name})", default="auto"),
            Option(("--no-archive",), "archive", "do not write the zip", const=None))


@dataclass(frozen=True)
class Challenge:
    """One challenge: its name, title, Python entry points and the options it adds to each sub-command."""
    name: str
    title: str
    convert: Callable
    export: Callable
    evaluate: Callable
    default_dataset: str
    convert_options: tuple = ()
    export_options: tuple = ()
    evaluate_options: tuple = ()

    def options(self, command: str) -> tuple:
        return {"convert": self.convert_options, "export": self.export_options,
                "evaluate": self.evaluate_options}[command]


# ------------------------------------------------------------------------------------------------ reading

def require_file(case: str, path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise CaseError(case, path, f"missing {what}")
    if os.path.getsize(path) == 0:
        raise CaseError(case, path, f"cannot read {what}: the file is empty")
    return path


def _sitk():
    import SimpleITK as sitk
    return sitk


def _itk_reason(e: Exception) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def _is_nifti(path: str) -> bool:
    return path.endswith((".nii", ".nii.gz"))


def _gunzip(case: str, path: str, data: bytes, what: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
        if b"\x1f\x8b".startswith(data):  # cut inside the 2-byte gzip magic: truncated, not a foreign format
            problem, reason = "truncated", f"{len(data)} byte, inside the gzip header"
        else:
            problem, reason = ("truncated" if isinstance(e, EOFError) else "corrupt"), e
        raise CaseError(case, path, f"cannot read {what}: the file is {problem} ({reason})") from None


def verify_complete(case: str, path: str, what: str = "image") -> None:
    """Fully decompress a gzip-compressed file without keeping it (SimpleITK reads a truncated ``.nii.gz`` as
    zeros without a word)."""
    if not path.endswith(".gz"):
        return
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                d.decompress(chunk)
                while d.unconsumed_tail:
                    d.decompress(d.unconsumed_tail)
    except zlib.error as e:
        raise CaseError(case, path, f"cannot read {what}: the file is corrupt ({e})") from None
    if not d.eof:
        raise CaseError(case, path, f"cannot read {what}: the file is truncated (Compressed file ended before the "
                                    "end-of-stream marker was reached)")


def _unreadable(case: str, path: str, what: str, error: Exception) -> CaseError:
    """The error for a file SimpleITK cannot read. A NIfTI cut short (inside the gzip header, or before the end of
    its NIfTI header) makes ITK answer "Unable to determine ImageIO reader"; only on this failure path is the file
    decoded with :func:`load_file`, so its message says truncated or corrupt. Reading stays one pass for good
    files."""
    if _is_nifti(path):
        try:
            load_file(case, path, what)
        except CaseError as e:
            return e
    return CaseError(case, path, f"cannot read {what} ({_itk_reason(error)})")


@dataclass
class Loaded:
    """A file read once: its bytes and, for NIfTI, the decoded image (nibabel, in memory)."""
    path: str
    data: bytes
    nifti: Any = None

    def array(self) -> np.ndarray:
        """Voxel array in nibabel axis order (x, y, z)."""
        return np.asanyarray(self.nifti.dataobj)

    def sitk_array(self) -> np.ndarray:
        """Voxel array in SimpleITK axis order (z, y, x), the array SimpleITK would return."""
        return self.array().transpose(2, 1, 0)


def load_file(case: str, path: str, what: str = "image") -> Loaded:
    """Read ``path`` once and decode all of it; a missing, truncated or corrupt file raises CaseError naming it.

    NIfTI (``.nii``/``.nii.gz``): the whole compressed stream is decompressed (gzip checks length and CRC) and the
    voxel data must be complete for the header's shape and type. Other formats are decoded with SimpleITK.
    The returned bytes are what converters copy, so no file is read twice.
    """
    require_file(case, path, what)
    with open(path, "rb") as f:
        data = f.read()
    if not _is_nifti(path):
        read_sitk(case, path, what)
        return Loaded(path, data)
    import nibabel
    raw = _gunzip(case, path, data, what) if path.endswith(".gz") else data
    nifti2 = len(raw) >= 4 and int.from_bytes(raw[:4], "little") in (540, 0x1c020000)
    header_size = 540 if nifti2 else 348
    if len(raw) < header_size:
        raise CaseError(case, path, f"cannot read {what}: the file is truncated ({len(raw)} "
                                    f"{'uncompressed ' if path.endswith('.gz') else ''}bytes; the NIfTI header "
                                    f"alone has {header_size})")
    try:
        klass = nibabel.Nifti2Image if nifti2 else nibabel.Nifti1Image
        img = klass.from_bytes(raw)
    except Exception as e:
        raise CaseError(case, path, f"cannot read {what} as NIfTI ({e})") from None
    if len(img.shape) != 3:
        raise CaseError(case, path, f"expected a 3-D {what}, got size {_numbers(img.shape)} ({AXES_NOTE})")
    # The voxel data starts at the proxy's offset (vox_offset as stored): after from_bytes the header's own
    # get_data_offset() is reset to 0, which would let a file short by less than the header length through.
    offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))
    needed = offset + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    if len(raw) < needed:
        size = "uncompressed " if path.endswith(".gz") else ""
        raise CaseError(case, path, f"cannot read {what}: the file is truncated ({len(raw)} {size}bytes of header "
                                    f"and voxel data, {needed} needed: {offset} of header and {needed - offset} "
                                    f"for size {_numbers(img.shape)} of type {img.get_data_dtype()})")
    return Loaded(path, data, img)


def read_sitk(case: str, path: str, what: str = "image"):
    """Read an image with SimpleITK; a missing, unreadable or truncated file raises CaseError."""
    require_file(case, path, what)
    verify_complete(case, path, what)
    sitk = _sitk()
    try:
        return sitk.ReadImage(path)
    except Exception as e:  # SimpleITK raises RuntimeError with a long ITK message
        raise _unreadable(case, path, what, e) from None


def read_nifti(case: str, path: str, what: str = "image"):
    """The fully decoded NIfTI image (nibabel, in memory); errors raise CaseError."""
    return load_file(case, path, what).nifti


def nifti_array(case: str, path: str, img=None) -> np.ndarray:
    img = img if img is not None else read_nifti(case, path)
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:
        raise CaseError(case, path, f"cannot read the voxel data ({e})") from None


def _numbers(values) -> str:
    """A tuple of plain numbers (no ``np.float64(...)``), rounded to 6 decimals."""
    return "(" + ", ".join(str(round(float(v), 6) + 0.0) if isinstance(v, (float, np.floating)) else str(int(v))
                           for v in values) + ")"


@dataclass(frozen=True)
class Geometry:
    """SimpleITK geometry: size (x, y, z), spacing, origin, direction (row-major 3x3)."""
    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of(cls, image) -> "Geometry":
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    @classmethod
    def read(cls, case: str, path: str, what: str = "image") -> "Geometry":
        """Header-only read."""
        require_file(case, path, what)
        sitk = _sitk()
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except Exception as e:
            raise _unreadable(case, path, what, e) from None
        return cls(tuple(int(s) for s in reader.GetSize()), tuple(float(s) for s in reader.GetSpacing()),
                   tuple(float(o) for o in reader.GetOrigin()), tuple(float(d) for d in reader.GetDirection()))

    @classmethod
    def from_nifti(cls, img) -> "Geometry":
        """The geometry SimpleITK gives the nibabel image ``img`` (its affine in ITK's LPS convention)."""
        m = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(img.affine, dtype=float)[:3]
        spacing = np.linalg.norm(m[:, :3], axis=0)
        direction = m[:, :3] / np.where(spacing > 0, spacing, 1.0)
        return cls(tuple(int(s) for s in img.shape[:3]), tuple(spacing.tolist()), tuple(m[:, 3].tolist()),
                   tuple(direction.ravel().tolist()))

    def three_d(self) -> "Geometry":
        """The first three axes of a 4-D geometry (e.g. SegRap2023's 4-D .mha)."""
        if len(self.size) == 3:
            return self
        n = len(self.size)
        d = np.asarray(self.direction).reshape(n, n)[:3, :3]
        return Geometry(self.size[:3], self.spacing[:3], self.origin[:3], tuple(d.ravel().tolist()))

    def differences(self, other: "Geometry", tolerance: float) -> list[str]:
        """What of ``other`` differs from this geometry, each as ``name (other) instead of (self)``."""
        if self.size != other.size:
            return [f"size {_numbers(other.size)} instead of {_numbers(self.size)}"]
        out = []
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=tolerance):
                out.append(f"{name} {_numbers(b)} instead of {_numbers(a)}")
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
                   tolerance: float, what: str = "label", reference_what: str = "image") -> None:
    """CaseError naming ``path`` if its geometry differs from ``reference`` by more than ``tolerance``. The one
    geometry message of the package: ``<what> geometry differs from the <reference_what> <file> (x, y, z as
    SimpleITK reports them; tolerance T): spacing (...) instead of (...); ...``."""
    diffs = reference.differences(geometry, tolerance)
    if diffs:
        raise CaseError(case, path, f"{what} geometry differs from the {reference_what} "
                                    f"{os.path.basename(reference_path)} ({AXES_NOTE}; tolerance {tolerance:g}): "
                                    + "; ".join(diffs))


def size_message(what: str, array_shape, reference_what: str, reference_shape, order: str = "sitk") -> str:
    """``<what> size (x, y, z) differs from the <reference> size (...)``, in the axis order of every geometry message
    (``array_shape`` in SimpleITK array order (z, y, x), or x, y, z with ``order='nibabel'``)."""
    a, b = (tuple(array_shape), tuple(reference_shape))
    if order == "sitk":
        a, b = a[::-1], b[::-1]
    return f"{what} size {_numbers(a)} differs from the {reference_what} size {_numbers(b)} ({AXES_NOTE})"


def check_affine(case: str, reference_path: str, ref_img, path: str, img, tolerance: float,
                 what: str = "label", reference_what: str = "image") -> None:
    """:func:`check_geometry` for nibabel images (their affines, in SimpleITK's convention)."""
    check_geometry(case, reference_path, Geometry.from_nifti(ref_img), path, Geometry.from_nifti(img), tolerance,
                   what, reference_what)


def open_nifti(case: str, path: str, what: str = "image"):
    """A NIfTI header with nibabel (voxel data stays on disk: for files whose header is all we need)."""
    require_file(case, path, what)
    import nibabel
    try:
        img = nibabel.load(path)
    except Exception as e:
        raise CaseError(case, path, f"cannot read {what} as NIfTI ({e})") from None
    if len(img.shape) != 3:
        raise CaseError(case, path, f"expected a 3-D {what}, got size {_numbers(img.shape)} ({AXES_NOTE})")
    return img


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


def check_label_values(case: str, path: str, arr: np.ndarray, allowed: Iterable[int], what: str = "label") \
        -> np.ndarray:
    """Return the distinct values of ``arr``; CaseError if any is not an integer in ``allowed``."""
    values = unique_values(arr)
    allowed = set(int(a) for a in allowed)
    bad = [v for v in values.tolist() if not float(v).is_integer() or int(v) not in allowed]
    if bad:
        shown = ", ".join(str(b) for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise CaseError(case, path, f"{what} values {shown} are not in this challenge's set {sorted(allowed)}")
    return values.astype(np.int64)


# ------------------------------------------------------------------------------------------------ writing

def write_bytes(data: bytes, dst: str) -> None:
    with atomic_output(dst) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


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


def is_temporary(name: str) -> bool:
    """Whether a file name is one of our temporaries (``nnunet_plugins.atomic`` naming)."""
    return TMP_PATTERN.match(name) is not None


def remove_temporaries(folder: str) -> list:
    """Delete our temporary files (by their naming pattern only) left anywhere below ``folder`` by a killed run;
    returns the removed paths."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for root, _, files in os.walk(folder):
        for f in files:
            if is_temporary(f):
                path = os.path.join(root, f)
                try:
                    os.remove(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return removed


def prepare_output_folder(path: str, what: str = "output folder", clean: bool = True) -> str:
    """Create ``path`` if needed and check that it can be written; ChallengeError naming it otherwise. With
    ``clean``, our own temporaries from an earlier, killed run are removed from it."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ChallengeError(f"the {what} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ChallengeError(f"cannot create the {what} {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ChallengeError(f"cannot write to the {what} {path}: permission denied")
    removed = remove_temporaries(path) if clean else []
    if removed:
        print(f"removed {len(removed)} temporary file(s) of an interrupted earlier run from {path}")
    return path


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
    if _is_nifti(reference):
        import nibabel
        ref = open_nifti(case, reference)
        data = array if order == "nibabel" else np.ascontiguousarray(array.transpose(2, 1, 0))
        if tuple(data.shape) != tuple(ref.shape):
            raise CaseError(case, out_path, size_message("array", data.shape, f"image {reference}", ref.shape,
                                                         "nibabel"))
        header = ref.header.copy()
        header.set_data_dtype(dtype)
        header.set_slope_inter(None, None)
        write_nifti(nibabel.Nifti1Image(data, None, header=header), out_path)
    else:
        sitk = _sitk()
        ref = Geometry.read(case, reference)
        data = array if order == "sitk" else np.ascontiguousarray(array.transpose(2, 1, 0))
        out = sitk.GetImageFromArray(data)
        if out.GetSize() != ref.size:
            raise CaseError(case, out_path, size_message("array", data.shape, f"image {reference}", ref.size[::-1]))
        write_sitk(ref.apply(out), out_path)
    return out_path


def place_sitk_file(case: str, src: str, dst: str, reference: Geometry | None = None,
                    tolerance: float = DEFAULT_GEOMETRY_TOLERANCE, reference_path: str | None = None,
                    loaded: Loaded | None = None, what: str = "image", reference_what: str = "image") -> None:
    """Copy ``src`` to ``dst`` (its bytes, fully decoded once: :func:`load_file`); if its geometry is within
    ``tolerance`` of ``reference`` but not equal as nnU-Net compares it, write it with the reference geometry
    (voxels unchanged) instead."""
    loaded = loaded or load_file(case, src, what)
    if reference is not None:
        geometry = Geometry.read(case, src, what)
        check_geometry(case, reference_path or "the reference image", reference, src, geometry, tolerance, what,
                       reference_what)
        if not geometry.nnunet_equal(reference):
            image = _sitk().GetImageFromArray(np.ascontiguousarray(loaded.sitk_array())) if loaded.nifti is not None \
                else read_sitk(case, src, what)
            write_sitk(reference.apply(image), dst)
            return
    write_bytes(loaded.data, dst)


def place_nifti_file(case: str, src: str, dst: str, reference=None, tolerance: float = DEFAULT_GEOMETRY_TOLERANCE,
                     reference_path: str | None = None, loaded: Loaded | None = None, what: str = "image") -> None:
    """nibabel counterpart of :func:`place_sitk_file` (the affine is the geometry)."""
    loaded = loaded or load_file(case, src, what)
    if reference is not None:
        check_affine(case, reference_path or "the reference image", reference, src, loaded.nifti, tolerance, what)
        if not np.allclose(loaded.nifti.affine, reference.affine):
            import nibabel
            img = loaded.nifti
            write_nifti(nibabel.Nifti1Image(nifti_array(case, src, img), reference.affine, img.header.copy()), dst)
            return
    write_bytes(loaded.data, dst)


# ------------------------------------------------------------------------------------------------ parallel

def progress_bar(total: int, desc: str = "", enabled: bool = True, unit: str = "case"):
    """The progress bar of every long loop here (converters, exporters, evaluators, ``combine``)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled or not total, unit=unit)


def worker_init() -> None:
    """Worker-process set-up: one ITK thread (the pool already uses the cores) and no traceback on Ctrl-C (the
    main process reports the interruption in one line)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _sitk().ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except Exception:
        pass


def _call(item):
    key, function, kwargs = item
    try:
        return key, True, function(**kwargs)
    except ChallengeError as e:
        return key, False, str(e)
    except Exception as e:  # keep the pool alive and report every failure together
        return key, False, f"case {key}: {type(e).__name__}: {e}"


def run_parallel(function: Callable, items: Sequence[tuple[str, dict]], num_processes: int = 1,
                 desc: str = "", progress: bool = True, on_result: Callable | None = None) -> dict:
    """Call ``function(**kwargs)`` (a module-level function: worker processes pickle it) for each
    ``(key, kwargs)`` of ``items`` in ``num_processes`` processes, with a progress bar. ``on_result(key, value)``
    runs in this process as each call succeeds. Returns {key: result}; if any call fails, raises ChallengeError
    listing every failure (the others have completed)."""
    if not callable(function):
        raise TypeError(f"run_parallel takes the function itself, got {function!r}")
    work = [(key, function, kwargs) for key, kwargs in items]
    results, failures = {}, []

    def collect(key, ok, value):
        if ok:
            results[key] = value
            if on_result is not None:
                on_result(key, value)
        else:
            failures.append(value)
        bar.update()

    bar = progress_bar(len(work), desc, progress)
    try:
        if num_processes <= 1 or len(work) <= 1:
            for item in work:
                collect(*_call(item))
        else:
            import multiprocessing
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(num_processes, len(work)), initializer=worker_init) as pool:
                for result in pool.imap_unordered(_call, work):
                    collect(*result)
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
    return prepare_output_folder(raw, "nnU-Net raw folder", clean=False)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ChallengeError(f"dataset ID must be in 1..999, got {dataset_id}")
    return f"Dataset{int(dataset_id):03d}_{name}"


@dataclass
class CaseJob:
    """Conversion of one case: ``function(dataset_dir=..., **kwargs)`` (a module-level function) writes ``outputs``
    (paths relative to the dataset folder, each written atomically) from the files ``sources``."""
    case: str
    function: Callable
    kwargs: dict
    outputs: list = field(default_factory=list)
    sources: list = field(default_factory=list)

    def stamps(self, release_dir: str) -> dict:
        """{source file relative to ``release_dir``: [size, modification time in ns]}: what the case is converted
        from. Relative paths, so a release moved or copied with its times (``mv``, ``cp -p``) is still up to date."""
        out = {}
        for p in self.sources:
            st = os.stat(p)
            out[_release_path(p, release_dir)] = [int(st.st_size), int(st.st_mtime_ns)]
        return out


def _release_path(path: str, release_dir: str) -> str:
    """``path`` relative to the release folder, with ``/`` (the record's keys and the names in messages)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(release_dir)).replace(os.sep, "/")


def _job_done(folder: str, job: CaseJob) -> bool:
    return all(os.path.isfile(os.path.join(folder, o)) for o in job.outputs)


def _expected_files(jobs: Sequence[CaseJob]) -> set:
    return {o for j in jobs for o in j.outputs}


def _dataset_files(folder: str) -> set:
    found = set()
    for root, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), folder)
            if rel not in ("dataset.json", "conversion.json", PROVENANCE_FILE) and not is_temporary(f):
                found.add(rel)
    return found


def _read_provenance(folder: str, release_dir: str) -> tuple[dict, bool]:
    """({case: {source relative to the release: [size, mtime]}}, whether the record is of an earlier version).
    Records of earlier versions (absolute paths) are read relative to ``release_dir``, so an unmoved release stays
    up to date (and the record is then rewritten with relative paths)."""
    try:
        with open(os.path.join(folder, PROVENANCE_FILE)) as f:
            cases = json.load(f).get("cases", {})
        legacy = any(os.path.isabs(p) for sources in cases.values() for p in sources)
        return {c: {(_release_path(p, release_dir) if os.path.isabs(p) else p): s for p, s in sources.items()}
                for c, sources in cases.items()}, legacy
    except (OSError, ValueError, AttributeError):
        return {}, False


def _changed(jobs: Sequence[CaseJob], stamps: dict, recorded: dict) -> dict:
    """{case: [changed source files]} of the jobs whose recorded sources differ from ``stamps`` (cases without a
    record map to [])."""
    out = {}
    for j in jobs:
        before = recorded.get(j.case)
        if before != stamps[j.case]:
            before = before or {}
            out[j.case] = sorted(p for p, s in stamps[j.case].items() if before.get(p) != s) if before else []
    return out


class _ProvenanceRecorder:
    """Records in the dataset folder, as cases finish, what each was converted from (written at most every two
    seconds and at the end, so an interrupted run keeps almost all of it)."""

    def __init__(self, folder: str, recorded: dict, stamps: dict):
        self.path = os.path.join(folder, PROVENANCE_FILE)
        self.cases = {c: s for c, s in recorded.items() if c in stamps}
        self.stamps, self.last = stamps, 0.0

    def __call__(self, case, _result=None, force: bool = False) -> None:
        import time
        if case is not None:
            self.cases[case] = self.stamps[case]
        if force or time.monotonic() - self.last > 2.0:
            write_json({"about": "nnunet-plugins: size and modification time (ns) of each case's source files "
                                 "(paths relative to the release folder) when it was converted; a rerun "
                                 "reconverts cases whose sources changed",
                        "cases": dict(sorted(self.cases.items()))}, self.path)
            self.last = time.monotonic()


def _remove_dropped_cases(partial: str, final: str, expected: set, recorded: dict, stamps: dict) -> None:
    """Remove the files of cases that are no longer in the release and say which (nnU-Net's preprocessed data and
    splits made from the dataset still list them)."""
    stale = sorted(_dataset_files(partial) - expected)
    for rel in stale:
        os.remove(os.path.join(partial, rel))
    dropped = sorted(set(recorded) - set(stamps))
    if dropped:
        print(f"removing {len(dropped)} case(s) that are no longer in the release from {final}: "
              f"{', '.join(dropped)} ({len(stale)} file(s)); rerun nnUNetv2_plan_and_preprocess, and delete "
              "splits_final.json in nnUNet_preprocessed if it lists them")
    elif stale:
        print(f"removing {len(stale)} file(s) of cases that are no longer in the release from {final}: "
              f"{', '.join(stale)}")


def build_dataset(raw_root: str, dataset_id: int, name: str, jobs: Sequence[CaseJob], dataset_json: dict,
                  release_dir: str, num_processes: int = 1, overwrite: bool = False, progress: bool = True) -> str:
    """Write the dataset ``raw_root/DatasetXXX_name`` from ``jobs`` (sources in ``release_dir``), atomically as a
    whole (see module doc).

    ``dataset_json['conversion']`` (the tool's options) identifies a run: a finished dataset with the same
    dataset.json and unchanged sources is left as it is; cases whose source files changed (size or modification
    time; paths relative to ``release_dir``) are reconverted; cases no longer in the release are removed from the
    dataset, with a message naming them (the dataset mirrors the release, as nnU-Net's dataset.json must count
    its files); a partial or finished dataset from other options needs ``overwrite``.
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
    stamps = {j.case: j.stamps(release_dir) for j in jobs}
    if os.path.isdir(final):
        existing_json = None
        if os.path.isfile(os.path.join(final, "dataset.json")):
            with open(os.path.join(final, "dataset.json")) as f:
                existing_json = json.load(f)
        recorded, legacy = _read_provenance(final, release_dir)
        if existing_json == dataset_json and expected == _dataset_files(final) \
                and not set(recorded) - set(stamps) and not _changed(jobs, stamps, recorded):
            if legacy:
                _ProvenanceRecorder(final, recorded, stamps)(None, force=True)
            print(f"{final} is complete and up to date; nothing to do (use --overwrite to convert again)")
            return final
        if existing_json is None or existing_json.get("conversion") != dataset_json.get("conversion"):
            raise ChallengeError(f"{final} exists and was not written by this conversion with these options; "
                                 "use --overwrite to replace it")
        if os.path.isdir(partial):
            shutil.rmtree(partial)
        os.replace(final, partial)  # resume the finished dataset as a partial one (release grew or changed)
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
    recorded, _ = _read_provenance(partial, release_dir)
    _remove_dropped_cases(partial, final, expected, recorded, stamps)
    recorded = {c: s for c, s in recorded.items() if c in stamps}
    done = [j for j in jobs if _job_done(partial, j)]
    changed = _changed(done, stamps, recorded)
    reconvert = {c: files for c, files in changed.items() if c in recorded}
    todo = [j for j in jobs if not _job_done(partial, j) or j.case in changed]
    if reconvert:
        listing = ", ".join(f"{c} ({', '.join(f) or 'sources'})" for c, f in sorted(reconvert.items()))
        print(f"reconverting {len(reconvert)} case(s) whose source files changed since they were converted: {listing}")
    unrecorded = len(changed) - len(reconvert)
    if unrecorded:
        print(f"converting {unrecorded} case(s) again: their files exist but there is no record of what they were "
              "converted from (an earlier version or a killed run)")
    resumed = len(jobs) - len(todo)
    if resumed and len(todo) > len(reconvert):
        print(f"resuming: {resumed} of {len(jobs)} cases already converted")
    recorder = _ProvenanceRecorder(partial, recorded, stamps)
    items = [(j.case, {"dataset_dir": partial, **j.kwargs}) for j in todo]
    by_function: dict = {}
    for j, item in zip(todo, items):
        by_function.setdefault(j.function, []).append(item)
    try:
        for function, group in by_function.items():
            run_parallel(function, group, num_processes, desc=f"converting {folder_name}", progress=progress,
                         on_result=recorder)
    finally:
        recorder(None, force=True)
    missing = sorted(expected - _dataset_files(partial))
    if missing:
        raise ChallengeError(f"conversion did not write {len(missing)} expected files, e.g. {missing[:3]}")
    write_json(dataset_json, os.path.join(partial, "dataset.json"))
    os.remove(marker)
    os.replace(partial, final)
    return final


# ------------------------------------------------------------------------------------------------ exports

def check_complete(expected: Iterable[str], available: Iterable[str], what: str, where: str, hint: str = "") -> None:
    missing = sorted(set(expected) - set(available))
    if missing:
        raise IncompleteError(what, missing, where, hint)


def check_extra(available: Iterable[str], expected: Iterable[str], what: str, where: str,
                allow_extra: bool = False) -> list:
    """The one rule of ``export`` and ``evaluate`` for predictions that match no expected case: an error listing
    them, or with ``allow_extra`` a printed note; returns them."""
    extra = sorted(set(available) - set(expected))
    if extra and not allow_extra:
        raise ExtraError(extra, what, where)
    if extra:
        print(f"note: ignoring {len(extra)} prediction(s) in {where} that match no {what}: {', '.join(extra)}")
    return extra


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
