"""KiPA22 (Kidney Parsing for renal cancer treatment, repository KiPA2022/kipa22).

Release layout::

    train/image/{0..69}.nii.gz   train/label/{0..69}.nii.gz   test/image/{70..99}.nii.gz   (open test set)

CTA cropped around the kidney, stored as unsigned 16-bit with an intensity offset (copied unchanged; nnU-Net's
CT normalisation works on the stored values). Labels 1 renal vein, 2 kidney, 3 renal artery, 4 tumour.
nnU-Net case ids are ``KiPA_<original name>``; the export writes the original names back.
"""
from __future__ import annotations

import os

from .common import (CaseError, CaseJob, Challenge, DEFAULT_GEOMETRY_TOLERANCE, Geometry, Option, ReleaseLayoutError,
                     build_dataset, check_complete, check_extra, check_geometry, check_label_values,
                     ignore_geometry_option, list_images, load_file, place_sitk_file, prepare_output_folder, read_sitk,
                     run_parallel, write_like)

CHALLENGE = "kipa22"
DEFAULT_DATASET_ID = 603
DEFAULT_NAME = "KiPA2022"
LABELS = {0: "background", 1: "renal vein", 2: "kidney", 3: "renal artery", 4: "tumor"}
STRUCTURES = {1: "Vein", 2: "Kidney", 3: "Artery", 4: "Tumor"}   # column names of the official evaluation
CASE_PREFIX = "KiPA_"


def case_id(stem: str) -> str:
    return CASE_PREFIX + stem


def original_name(case: str) -> str:
    return case[len(CASE_PREFIX):] if case.startswith(CASE_PREFIX) else case


def convert_case(dataset_dir: str, case: str, image: str, label: str | None, image_out: str,
                 label_out: str | None, tolerance: float) -> None:
    reference = Geometry.read(case, image)
    if label is not None:
        seg = load_file(case, label, "label")
        check_label_values(case, label, seg.array(), LABELS)
        place_sitk_file(case, label, os.path.join(dataset_dir, label_out), reference, tolerance, image, loaded=seg,
                        what="label")
    place_sitk_file(case, image, os.path.join(dataset_dir, image_out))


def convert(release_dir: str, raw: str | None = None, dataset_id: int = DEFAULT_DATASET_ID, name: str = DEFAULT_NAME,
            num_processes: int = 1, overwrite: bool = False, tolerance: float = DEFAULT_GEOMETRY_TOLERANCE,
            progress: bool = True) -> str:
    train_images = os.path.join(release_dir, "train", "image")
    train_labels = os.path.join(release_dir, "train", "label")
    test_images = os.path.join(release_dir, "test", "image")
    if not os.path.isdir(train_images) or not os.path.isdir(train_labels):
        raise ReleaseLayoutError(f"{release_dir} is not a KiPA22 release: expected train/image/N.nii.gz and "
                                 "train/label/N.nii.gz (and optionally test/image/)")
    images = list_images(train_images, (".nii.gz",))
    if not images:
        raise ReleaseLayoutError(f"no .nii.gz images in {train_images}")
    jobs = []
    for stem, image in images.items():
        case = case_id(stem)
        label = os.path.join(train_labels, f"{stem}.nii.gz")
        if not os.path.isfile(label):
            raise CaseError(case, label, "missing label")
        outs = [os.path.join("imagesTr", f"{case}_0000.nii.gz"), os.path.join("labelsTr", f"{case}.nii.gz")]
        jobs.append(CaseJob(case, convert_case,
                            {"case": case, "image": image, "label": label, "image_out": outs[0],
                             "label_out": outs[1], "tolerance": tolerance}, outs, [image, label]))
    extra_labels = sorted(set(list_images(train_labels, (".nii.gz",))) - set(images))
    if extra_labels:
        stem = extra_labels[0]
        raise CaseError(case_id(stem), os.path.join(train_images, f"{stem}.nii.gz"), "missing image for this label")
    if os.path.isdir(test_images):
        for stem, image in list_images(test_images, (".nii.gz",)).items():
            case = case_id(stem)
            out = os.path.join("imagesTs", f"{case}_0000.nii.gz")
            jobs.append(CaseJob(case, convert_case,
                                {"case": case, "image": image, "label": None, "image_out": out, "label_out": None,
                                 "tolerance": tolerance}, [out], [image]))
    dj = {
        "channel_names": {"0": "CT"},
        "labels": {n: v for v, n in LABELS.items()},
        "numTraining": len(images),
        "file_ending": ".nii.gz",
        "name": DEFAULT_NAME,
        "reference": "https://kipa22.grand-challenge.org/",
        "description": "KiPA22 converted by nnunet-plugins; case ids KiPA_<original name>",
        "conversion": {"tool": "nnunet-plugins", "challenge": CHALLENGE},
    }
    return build_dataset(raw, dataset_id, name, jobs, dj, release_dir, num_processes=num_processes,
                         overwrite=overwrite, progress=progress)


# ------------------------------------------------------------------------------------------- export

def reference_images(images: str) -> dict:
    """{original name: image} from a KiPA release (test/image inside it), a folder of N.nii.gz images or nnU-Net's
    imagesTs (KiPA_N_0000.nii.gz)."""
    folder = os.path.join(images, "test", "image") if os.path.isdir(os.path.join(images, "test", "image")) else images
    refs = {}
    for stem, path in list_images(folder, (".nii.gz",)).items():
        if stem.endswith("_0000") and stem.startswith(CASE_PREFIX):
            stem = original_name(stem[:-5])
        refs[stem] = path
    if not refs:
        raise ReleaseLayoutError(f"no KiPA22 images in {images}")
    return refs


def export_case(case: str, prediction: str, reference: str, out_path: str, tolerance: float) -> str:
    import SimpleITK as sitk
    ref = Geometry.read(case, reference)
    pred = read_sitk(case, prediction, "prediction")
    check_geometry(case, reference, ref, prediction, Geometry.of(pred), tolerance, "prediction", "input image")
    arr = sitk.GetArrayFromImage(pred)
    check_label_values(case, prediction, arr, LABELS, "prediction")
    return write_like(case, reference, arr, out_path)


def export(pred_dir: str, out_dir: str, images: str, num_processes: int = 1,
           tolerance: float = DEFAULT_GEOMETRY_TOLERANCE, progress: bool = True, allow_extra: bool = False) -> list:
    """nnU-Net predictions (``KiPA_N.nii.gz``, or already ``N.nii.gz``) -> ``out_dir/N.nii.gz``: the input
    image's name, labels 1-4 (uint8), the image's exact geometry."""
    refs = reference_images(images)
    preds = {original_name(k): v for k, v in list_images(pred_dir, (".nii.gz",)).items()}
    check_complete(refs, preds, "KiPA22 predictions", pred_dir)
    check_extra(preds, refs, "input image", pred_dir, allow_extra)
    prepare_output_folder(out_dir)
    items = [(n, {"case": n, "prediction": preds[n], "reference": r, "out_path": os.path.join(out_dir, f"{n}.nii.gz"),
                  "tolerance": tolerance}) for n, r in refs.items()]
    written = run_parallel(export_case, items, num_processes, desc="exporting KiPA22",
                           progress=progress)
    return [written[n] for n in refs]


# ------------------------------------------------------------------------------------------- the table entry

def evaluate(pred_dir: str, gt_dir: str, **options) -> dict:
    """:func:`nnunet_plugins.evaluation.kipa22.evaluate` (imported on use: it needs scipy)."""
    from nnunet_plugins.evaluation import kipa22 as evaluation
    return evaluation.evaluate(pred_dir, gt_dir, **options)


SPEC = Challenge(
    name=CHALLENGE, title="KiPA22", convert=convert, export=export, evaluate=evaluate,
    default_dataset=str(DEFAULT_DATASET_ID),
    evaluate_options=(
        Option(("--official-spacing-bug",), "official_spacing_bug", "reproduce the official script's spacing error "
               "when resampling the prediction", flag=True),
        ignore_geometry_option("it resamples each image with its own geometry")),
)
