"""KiTS21 (Kidney and Kidney Tumor Segmentation 2021, repository neheller/kits21).

Release layout (the ``kits21/data`` folder of the challenge repository, imaging downloaded into it)::

    case_00000/imaging.nii.gz
               aggregated_MAJ_seg.nii.gz  aggregated_AND_seg.nii.gz  aggregated_OR_seg.nii.gz
               segmentations/{kidney|tumor|cyst}_instance-{i}_annotation-{a}.nii.gz
               segmentation_samples/group_{k}/kidney_i..a.._cyst..._tumor....nii.gz   (optional)

Labels 1 kidney, 2 tumor, 3 cyst. The arrays are stored (slices, H, W) with an affine that has no
canonical orientation; like nnU-Net's KiTS converter (Dataset220_KiTS2023) the files are copied unchanged
and ``dataset.json`` selects ``NibabelIOWithReorient``, which reorients to RAS on reading and writes
predictions back in the original orientation. The dataset is region-based: kidney (1, 2, 3), masses
(2, 3), tumor 2, ``regions_class_order`` (1, 3, 2), so nnU-Net's predictions carry the original label values.

Grand-challenge container: ``/input/images/ct/<name>.mha`` -> ``/output/images/kidney-tumor-and-cyst/<name>.mha``.
The organisers' own nnU-Net example maps the .mha array to the KiTS NIfTI layout by moving the last array axis
first and building the affine from the spacing alone; :func:`mha_to_kits_nifti` / :func:`kits_nifti_to_mha`
follow that convention so a model trained on the NIfTI release sees test images exactly as the organisers do.
"""
from __future__ import annotations

import os
import re

import numpy as np

from .common import (CaseError, CaseJob, Challenge, ChallengeError, DEFAULT_GEOMETRY_TOLERANCE, Geometry, Option,
                     ReleaseLayoutError, build_dataset, check_affine, check_complete, check_extra, check_geometry,
                     check_label_values, ignore_geometry_option, list_images, load_file, nifti_array, open_nifti,
                     place_nifti_file, prepare_output_folder, read_sitk, run_parallel, size_message, write_like,
                     write_nifti, write_sitk)

CHALLENGE = "kits21"
DEFAULT_DATASET_ID = 135
DEFAULT_NAME = "KiTS2021"

LABELS = {0: "background", 1: "kidney", 2: "tumor", 3: "cyst"}
# kidney first, then cyst, then tumor: a later label overwrites an earlier one where annotations overlap
LABEL_AGGREGATION_ORDER = (1, 3, 2)
# hierarchical evaluation classes (HECs)
HEC_LABELS = {"kidney_and_mass": (1, 2, 3), "mass": (2, 3), "tumor": (2,)}
# Surface Dice tolerances (mm), kits21/configuration/labels.py, HEC_SD_TOLERANCES_MM at commit 697892ba of
# neheller/kits21 (the revision whose metrics.py imports HEC_SD_TOLERANCES_MM). An earlier revision
# (HEC_NSD_TOLERANCES_MM, e.g. commit 14e9dca1) had 2.1781 / 1.3930 / 1.5363; select it with
# tolerances="older".
SD_TOLERANCES_MM = {"kidney_and_mass": 1.0330772532390826, "mass": 1.1328796488598762,
                    "tumor": 1.1498198361434828}
OLDER_SD_TOLERANCES_MM = {"kidney_and_mass": 2.1780822681004897, "mass": 1.3929527150618852,
                          "tumor": 1.536272517110166}
TOLERANCE_REVISIONS = {
    "final": ("neheller/kits21@697892ba kits21/configuration/labels.py HEC_SD_TOLERANCES_MM", SD_TOLERANCES_MM),
    "older": ("neheller/kits21@14e9dca1 kits21/configuration/labels.py HEC_NSD_TOLERANCES_MM",
              OLDER_SD_TOLERANCES_MM),
}
LABEL_FILES = {"majority": "aggregated_MAJ_seg.nii.gz", "and": "aggregated_AND_seg.nii.gz",
               "or": "aggregated_OR_seg.nii.gz"}
IMAGE_FILE = "imaging.nii.gz"
SAMPLES_FOLDER = "segmentation_samples"
ANNOTATION_PATTERN = re.compile(r"^(kidney|tumor|cyst)_instance-(\d+)_annotation-(\d+)\.nii\.gz$")
CASE_PATTERN = re.compile(r"^case_\d{5}$")
INPUT_SUBDIR = os.path.join("images", "ct")
OUTPUT_SUBDIR = os.path.join("images", "kidney-tumor-and-cyst")


def dataset_json(num_training: int, label_source: str) -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2},
        "regions_class_order": list(LABEL_AGGREGATION_ORDER),
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "NibabelIOWithReorient",
        "name": DEFAULT_NAME,
        "reference": "https://kits21.kits-challenge.org/",
        "description": f"KiTS21 converted by nnunet-plugins; training labels = {LABEL_FILES[label_source]}",
        "conversion": {"tool": "nnunet-plugins", "challenge": CHALLENGE, "label_source": label_source},
    }


def find_case_folders(release_dir: str) -> tuple[str, list[str]]:
    """(folder holding the case_XXXXX folders, sorted case ids). Accepts ``kits21/data`` itself or a folder
    above it (the repository root or its ``kits21`` package folder)."""
    if not os.path.isdir(release_dir):
        raise ReleaseLayoutError(f"KiTS21 release folder not found: {release_dir}")
    for candidate in (release_dir, os.path.join(release_dir, "data"), os.path.join(release_dir, "kits21", "data")):
        if os.path.isdir(candidate):
            cases = sorted(d for d in os.listdir(candidate)
                           if CASE_PATTERN.match(d) and os.path.isdir(os.path.join(candidate, d)))
            if cases:
                return candidate, cases
    raise ReleaseLayoutError(f"{release_dir} is not a KiTS21 release: expected case_XXXXX folders (kits21/data) "
                             f"each with {IMAGE_FILE} and {LABEL_FILES['majority']}")


def convert_case(dataset_dir: str, case: str, image: str, label: str, tolerance: float) -> None:
    img = load_file(case, image, "image")
    seg = load_file(case, label, "label")
    check_affine(case, image, img.nifti, label, seg.nifti, tolerance)
    check_label_values(case, label, seg.array(), LABELS)
    place_nifti_file(case, label, os.path.join(dataset_dir, "labelsTr", f"{case}.nii.gz"), img.nifti, tolerance,
                     image, loaded=seg, what="label")
    place_nifti_file(case, image, os.path.join(dataset_dir, "imagesTr", f"{case}_0000.nii.gz"), loaded=img)


def convert(release_dir: str, raw: str | None = None, dataset_id: int = DEFAULT_DATASET_ID,
            name: str = DEFAULT_NAME, label_source: str = "majority", num_processes: int = 1,
            overwrite: bool = False, tolerance: float = DEFAULT_GEOMETRY_TOLERANCE, progress: bool = True) -> str:
    """Convert the KiTS21 release into ``nnUNet_raw/DatasetXXX_name`` (see the module docstring)."""
    if label_source not in LABEL_FILES:
        raise ChallengeError(f"label source must be one of {sorted(LABEL_FILES)}, got {label_source!r}")
    data_dir, cases = find_case_folders(release_dir)
    jobs = []
    for case in cases:
        image = os.path.join(data_dir, case, IMAGE_FILE)
        label = os.path.join(data_dir, case, LABEL_FILES[label_source])
        for path, what in ((image, "CT image (download it with the challenge's get_imaging script)"),
                           (label, f"label {LABEL_FILES[label_source]}")):
            if not os.path.isfile(path):
                raise CaseError(case, path, f"missing {what}")
        jobs.append(CaseJob(case, convert_case,
                            {"case": case, "image": image, "label": label, "tolerance": tolerance},
                            [os.path.join("imagesTr", f"{case}_0000.nii.gz"),
                             os.path.join("labelsTr", f"{case}.nii.gz")], [image, label]))
    return build_dataset(raw, dataset_id, name, jobs, dataset_json(len(jobs), label_source), release_dir,
                         num_processes=num_processes, overwrite=overwrite, progress=progress)


# ------------------------------------------------------------------------------------------- .mha <-> NIfTI

def kits_affine(spacing) -> np.ndarray:
    """The affine the organisers give a test image converted from .mha (spacing = the .mha's spacing)."""
    s0, s1, s2 = (float(s) for s in spacing)
    return np.array([[0.0, 0.0, -s2, 0.0], [0.0, -s1, 0.0, 0.0], [-s0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def mha_to_kits_nifti(case: str, mha_path: str, nifti_path: str) -> None:
    import nibabel
    import SimpleITK as sitk
    image = read_sitk(case, mha_path)
    array = np.moveaxis(sitk.GetArrayFromImage(image), -1, 0)
    write_nifti(nibabel.Nifti1Image(array, kits_affine(image.GetSpacing())), nifti_path)


def kits_nifti_to_mha(case: str, nifti_path: str, reference_mha: str, mha_path: str) -> None:
    """Write a KiTS-layout NIfTI segmentation as .mha in the geometry of the input .mha."""
    import SimpleITK as sitk
    reference = read_sitk(case, reference_mha)
    array = np.moveaxis(load_file(case, nifti_path, "prediction").array(), 0, -1)
    expected = sitk.GetArrayViewFromImage(reference).shape
    if array.shape != tuple(expected):
        raise CaseError(case, nifti_path, size_message("prediction (as .mha)", array.shape,
                                                       f"input image {reference_mha}", expected))
    check_label_values(case, nifti_path, array, LABELS, "prediction")
    out = sitk.GetImageFromArray(array.astype(np.uint8))
    out.CopyInformation(reference)
    write_sitk(out, mha_path)


# ------------------------------------------------------------------------------------------- export

def reference_images(images: str) -> dict:
    """{case name: reference image} from a KiTS21 release, a grand-challenge input folder (.mha, directly or
    under images/ct) or a folder of NIfTI images (``case.nii.gz`` or nnU-Net's ``case_0000.nii.gz``)."""
    try:
        data_dir, cases = find_case_folders(images)
        return {c: os.path.join(data_dir, c, IMAGE_FILE) for c in cases}
    except ReleaseLayoutError:
        pass
    folder = os.path.join(images, INPUT_SUBDIR) if os.path.isdir(os.path.join(images, INPUT_SUBDIR)) else images
    found = list_images(folder)
    refs = {}
    for stem, path in found.items():
        refs[stem[:-5] if stem.endswith("_0000") and path.endswith(".nii.gz") else stem] = path
    if not refs:
        raise ReleaseLayoutError(f"no KiTS21 images in {images}: expected case_XXXXX folders, .mha files or "
                                 ".nii.gz images")
    return refs


def export_case(case: str, prediction: str, reference: str, out_path: str, tolerance: float) -> str:
    if reference.endswith(".mha"):
        if prediction.endswith(".mha"):
            import SimpleITK as sitk
            pred = read_sitk(case, prediction, "prediction")
            check_geometry(case, reference, Geometry.read(case, reference), prediction, Geometry.of(pred), tolerance,
                           "prediction", "input image")
            array = sitk.GetArrayFromImage(pred)
            check_label_values(case, prediction, array, LABELS, "prediction")
            return write_like(case, reference, array, out_path)
        kits_nifti_to_mha(case, prediction, reference, out_path)
        return out_path
    ref = open_nifti(case, reference)
    pred = load_file(case, prediction, "prediction").nifti
    check_affine(case, reference, ref, prediction, pred, tolerance, "prediction", "input image")
    array = nifti_array(case, prediction, pred)
    check_label_values(case, prediction, array, LABELS, "prediction")
    return write_like(case, reference, array, out_path, order="nibabel")


def export(pred_dir: str, out_dir: str, images: str, num_processes: int = 1,
           tolerance: float = DEFAULT_GEOMETRY_TOLERANCE, progress: bool = True,
           allow_extra: bool = False) -> list[str]:
    """nnU-Net predictions -> KiTS21 submission files.

    With .mha reference images (the grand-challenge input) the output is the container layout
    ``out_dir/images/kidney-tumor-and-cyst/<name>.mha``; with NIfTI references (the release, or imagesTs) it is
    ``out_dir/<case>.nii.gz`` as the official evaluation expects. Labels 1 kidney, 2 tumor, 3 cyst (uint8) in the
    reference image's exact geometry. Every reference case must have a prediction; a prediction that matches no
    reference image is an error unless ``allow_extra``.
    """
    refs = reference_images(images)
    preds = list_images(pred_dir)
    check_complete(refs, preds, "KiTS21 predictions", pred_dir)
    check_extra(preds, refs, "input image", pred_dir, allow_extra)
    prepare_output_folder(out_dir)
    items = []
    for case, ref in refs.items():
        if ref.endswith(".mha"):
            out_path = os.path.join(out_dir, OUTPUT_SUBDIR, f"{case}.mha")
        else:
            out_path = os.path.join(out_dir, f"{case}.nii.gz")
        items.append((case, {"case": case, "prediction": preds[case], "reference": ref, "out_path": out_path,
                             "tolerance": tolerance}))
    written = run_parallel(export_case, items, num_processes, desc="exporting KiTS21", progress=progress)
    return [written[c] for c in refs]


# ------------------------------------------------------------------------------------------- the table entry

def evaluate(pred_dir: str, gt_dir: str, **options) -> dict:
    """:func:`nnunet_plugins.evaluation.kits21.evaluate` (imported on use: it needs scipy)."""
    from nnunet_plugins.evaluation import kits21 as evaluation
    return evaluation.evaluate(pred_dir, gt_dir, **options)


SPEC = Challenge(
    name=CHALLENGE, title="KiTS21", convert=convert, export=export, evaluate=evaluate,
    default_dataset=str(DEFAULT_DATASET_ID),
    convert_options=(
        Option(("--kits-label",), "label_source", "training label: aggregated MAJ/AND/OR segmentation (default "
               "majority)", default="majority", choices=tuple(LABEL_FILES)),),
    evaluate_options=(
        Option(("--reference",), "reference", "majority vote, annotation samples, or both (samples where present; "
               "default both)", default="both", choices=("both", "majority", "samples")),
        Option(("--tolerances",), "tolerances", "surface Dice tolerances of the final or the older labels.py "
               "revision (default final)", default="final", choices=tuple(TOLERANCE_REVISIONS)),
        ignore_geometry_option("it uses the prediction's spacing")),
)
