"""SegRap2023 (organs at risk and gross tumour volumes of nasopharyngeal carcinoma, HiLab-git/SegRap2023).

Release layout::

    SegRap2023_Training_Set_120cases/segrap_XXXX/image.nii.gz            non-contrast CT
                                                 image_contrast.nii.gz   contrast CT (aligned)
                                                 <Organ>.nii.gz          45 binary OAR masks (they overlap)
                                                 GTVp.nii.gz  GTVnd.nii.gz
    SegRap2023_Training_Set_120cases_OneHot_Labels/Task001/segrap_XXXX.nii.gz   54-class map of the OARs
                                                  /Task002/segrap_XXXX.nii.gz   1 GTVp, 2 GTVnd

The "OneHot" maps are not one-hot: each is one label map whose classes are the distinct combinations of
overlapping masks (class 6 = TemporalLobe_L and Hippocampus_L inside Brain, ...). :data:`CLASS_ORGANS` is the
organisers' decoding (their post-processing); the organ masks are recovered from a map by
:func:`decode`, and a map is built from masks by :func:`encode` (used when the map folder is absent).

nnU-Net dataset: channels ``_0000`` non-contrast CT, ``_0001`` contrast CT (both ``CT`` normalisation); task 1
labels = the 54 classes, task 2 labels = GTVp 1, GTVnd 2. A folder ``SegRap2023_Validation_Set*`` with case
folders holding the two images (if present next to the training set) becomes imagesTs.

Submissions: validation = zip of ``<case>/<Organ>.nii.gz``; test = grand-challenge container, inputs
``/input/images/head-neck-ct/<uuid>.mha`` and ``/input/images/head-neck-contrast-enhanced-ct/<uuid>.mha``, output
one 4-D uint8 .mha [45 or 2, Z, Y, X] in ``/output/images/head-neck-segmentation/`` (task 1) or
``/output/images/gross-tumor-volume-segmentation/`` (task 2), channels in :data:`OARS` / :data:`GTVS` order.
"""
from __future__ import annotations

import os
import re

import numpy as np

from .common import (CaseError, CaseJob, Challenge, ChallengeError, DEFAULT_GEOMETRY_TOLERANCE, Geometry, Option,
                     ReleaseLayoutError, archive_options, build_dataset, check_complete, check_extra, check_geometry,
                     check_label_values, ignore_geometry_option, list_images, load_file, place_sitk_file,
                     prepare_output_folder, read_sitk, run_parallel, write_like, write_sitk, write_zip)

CHALLENGE = "segrap2023"
DEFAULT_DATASET_IDS = {1: 601, 2: 602}
DEFAULT_NAMES = {1: "SegRap2023_OARs", 2: "SegRap2023_GTVs"}
TRAINING_FOLDER = "SegRap2023_Training_Set_120cases"
MAP_FOLDER = "SegRap2023_Training_Set_120cases_OneHot_Labels"
MAP_SUBFOLDERS = {1: "Task001", 2: "Task002"}
VALIDATION_PREFIX = "SegRap2023_Validation_Set"
IMAGE_FILES = ("image.nii.gz", "image_contrast.nii.gz")
CASE_PATTERN = re.compile(r"^segrap_\d{4}$", re.IGNORECASE)

# The organs at risk in the official channel order of the 4-D test-phase output (not alphabetical).
OARS = ("Brain", "BrainStem", "Chiasm", "TemporalLobe_L", "TemporalLobe_R", "Hippocampus_L", "Hippocampus_R",
        "Eye_L", "Eye_R", "Lens_L", "Lens_R", "OpticNerve_L", "OpticNerve_R", "MiddleEar_L", "MiddleEar_R",
        "IAC_L", "IAC_R", "TympanicCavity_L", "TympanicCavity_R", "VestibulSemi_L", "VestibulSemi_R",
        "Cochlea_L", "Cochlea_R", "ETbone_L", "ETbone_R", "Pituitary", "OralCavity", "Mandible_L", "Mandible_R",
        "Submandibular_L", "Submandibular_R", "Parotid_L", "Parotid_R", "Mastoid_L", "Mastoid_R", "TMjoint_L",
        "TMjoint_R", "SpinalCord", "Esophagus", "Larynx", "Larynx_Glottic", "Larynx_Supraglot", "PharynxConst",
        "Thyroid", "Trachea")
GTVS = ("GTVp", "GTVnd")
STRUCTURES = {1: OARS, 2: GTVS}

# Task 1 classes: class value -> the organs that contain its voxels (organisers' decoding table).
CLASS_ORGANS = {
    1: ("Brain",), 2: ("Brain", "BrainStem"), 3: ("Brain", "Chiasm"), 4: ("Brain", "TemporalLobe_L"),
    5: ("Brain", "TemporalLobe_R"), 6: ("Brain", "TemporalLobe_L", "Hippocampus_L"),
    7: ("Brain", "TemporalLobe_R", "Hippocampus_R"), 8: ("Brain", "Hippocampus_L"), 9: ("Brain", "Hippocampus_R"),
    10: ("Eye_L",), 11: ("Eye_R",), 12: ("Eye_L", "Lens_L"), 13: ("Eye_R", "Lens_R"), 14: ("OpticNerve_L",),
    15: ("OpticNerve_R",), 16: ("MiddleEar_L",), 17: ("MiddleEar_R",), 18: ("MiddleEar_L", "IAC_L"),
    19: ("MiddleEar_R", "IAC_R"), 20: ("MiddleEar_L", "TympanicCavity_L"), 21: ("MiddleEar_R", "TympanicCavity_R"),
    22: ("TympanicCavity_L",), 23: ("TympanicCavity_R",), 24: ("MiddleEar_L", "VestibulSemi_L"),
    25: ("MiddleEar_R", "VestibulSemi_R"), 26: ("VestibulSemi_L",), 27: ("VestibulSemi_R",),
    28: ("MiddleEar_L", "Cochlea_L"), 29: ("MiddleEar_R", "Cochlea_R"), 30: ("MiddleEar_L", "ETbone_L"),
    31: ("MiddleEar_R", "ETbone_R"), 32: ("ETbone_L",), 33: ("ETbone_R",), 34: ("Pituitary",), 35: ("OralCavity",),
    36: ("Mandible_L",), 37: ("Mandible_R",), 38: ("Submandibular_L",), 39: ("Submandibular_R",),
    40: ("Parotid_L",), 41: ("Parotid_R",), 42: ("Mastoid_L",), 43: ("Mastoid_R",), 44: ("TMjoint_L",),
    45: ("TMjoint_R",), 46: ("SpinalCord",), 47: ("Esophagus",), 48: ("Larynx",), 49: ("Larynx", "Larynx_Glottic"),
    50: ("Larynx", "Larynx_Supraglot"), 51: ("Larynx", "PharynxConst"), 52: ("PharynxConst",), 53: ("Thyroid",),
    54: ("Trachea",),
}
# Task 2 classes
GTV_CLASSES = {1: ("GTVp",), 2: ("GTVnd",)}
CLASSES = {1: CLASS_ORGANS, 2: GTV_CLASSES}

# organ -> class values whose voxels belong to it
DECODE = {t: {s: tuple(sorted(c for c, organs in CLASSES[t].items() if s in organs)) for s in STRUCTURES[t]}
          for t in (1, 2)}

# NSD tolerances (mm) of the official evaluation (Eval/SegRap_Task00*_DSC_NSD_Eval.py)
NSD_TOLERANCE_MM = {**{o: 1.0 for o in OARS}, "Larynx": 2.0, "OralCavity": 3.0, "GTVp": 1.0, "GTVnd": 1.0}

GC_INPUTS = (os.path.join("images", "head-neck-ct"), os.path.join("images", "head-neck-contrast-enhanced-ct"))
GC_OUTPUTS = {1: os.path.join("images", "head-neck-segmentation"),
              2: os.path.join("images", "gross-tumor-volume-segmentation")}


def _check_task(task: int) -> None:
    if task not in (1, 2):
        raise ChallengeError(f"SegRap2023 task must be 1 (organs at risk) or 2 (GTVs), got {task}")


def class_name(organs: tuple) -> str:
    return "+".join(organs)


def labels_json(task: int) -> dict:
    return {"background": 0, **{class_name(o): c for c, o in CLASSES[task].items()}}


def structure_lookup(task: int) -> dict:
    """{structure: bool lookup table over the class values} (index the table with a label map)."""
    tables = {}
    for s in STRUCTURES[task]:
        table = np.zeros(len(CLASSES[task]) + 1, dtype=bool)
        table[list(DECODE[task][s])] = True
        tables[s] = table
    return tables


def iter_decoded(label_map: np.ndarray, task: int):
    """Yield (structure, bool mask) from a task's label map, one structure at a time (memory: one mask)."""
    arr = np.asarray(label_map)
    if arr.size and (arr.min() < 0 or arr.max() > len(CLASSES[task])):
        raise ValueError(f"label map values must be in 0..{len(CLASSES[task])}")
    arr = arr.astype(np.intp, copy=False)
    for s, table in structure_lookup(task).items():
        yield s, table[arr]


def decode(label_map: np.ndarray, task: int) -> dict:
    """{structure: bool mask} from a task's label map (values outside the table raise ValueError)."""
    return dict(iter_decoded(label_map, task))


def encode(masks: dict, task: int) -> np.ndarray:
    """The task's label map from {structure: mask}; ValueError if a voxel belongs to a combination of
    structures that is no class of the table."""
    bits = None
    for i, s in enumerate(STRUCTURES[task]):
        if s in masks:
            m = (np.asarray(masks[s]) > 0).astype(np.int64) << i
            bits = m if bits is None else bits | m
    return encode_bits(bits, task)


def encode_bits(bits: np.ndarray, task: int) -> np.ndarray:
    """Label map from per-voxel structure bits (bit i set = inside ``STRUCTURES[task][i]``)."""
    structures = STRUCTURES[task]
    code_to_class = {sum(1 << structures.index(o) for o in organs): c for c, organs in CLASSES[task].items()}
    combos, inverse = np.unique(bits, return_inverse=True)
    values = np.zeros(len(combos), dtype=np.uint8)
    for k, code in enumerate(combos.tolist()):
        if code == 0:
            continue
        if code not in code_to_class:
            organs = [s for i, s in enumerate(structures) if code >> i & 1]
            raise ValueError(f"{int((inverse == k).sum())} voxels belong to {' + '.join(organs)}, "
                             "a combination that is no class of the SegRap label map")
        values[k] = code_to_class[code]
    return values[inverse.reshape(bits.shape)]


# ------------------------------------------------------------------------------------------- convert

def find_release(release_dir: str) -> tuple[str, list[str]]:
    """(training-set folder, sorted case ids)."""
    if not os.path.isdir(release_dir):
        raise ReleaseLayoutError(f"SegRap2023 release folder not found: {release_dir}")
    for candidate in (os.path.join(release_dir, TRAINING_FOLDER), release_dir):
        if os.path.isdir(candidate):
            cases = sorted(d for d in os.listdir(candidate)
                           if CASE_PATTERN.match(d) and os.path.isdir(os.path.join(candidate, d)))
            if cases:
                return candidate, cases
    raise ReleaseLayoutError(f"{release_dir} is not a SegRap2023 release: expected {TRAINING_FOLDER}/segrap_XXXX "
                             f"folders with {IMAGE_FILES[0]}, {IMAGE_FILES[1]} and the organ masks")


def _load_label(case: str, path: str, reference_path: str, reference: Geometry, tolerance: float, what: str):
    """(array in SimpleITK order, loaded file) of a mask or label map, read once, checked against the image."""
    loaded = load_file(case, path, what)
    check_geometry(case, reference_path, reference, path, Geometry.read(case, path, what), tolerance, what,
                   "non-contrast CT image")
    return loaded.sitk_array(), loaded


def convert_case(dataset_dir: str, case: str, images: list, label_map: str | None, masks: dict | None,
                 task: int, check_masks: bool, tolerance: float, image_out: list, label_out: str | None) -> None:
    import SimpleITK as sitk
    reference = Geometry.read(case, images[0], "non-contrast CT image")
    if label_out is not None:
        from_masks = None
        if masks is not None and (label_map is None or check_masks):
            bits = None
            for i, s in enumerate(STRUCTURES[task]):  # one mask in memory at a time
                arr, _ = _load_label(case, masks[s], images[0], reference, tolerance, f"mask of {s}")
                check_label_values(case, masks[s], arr, (0, 1), f"mask of {s}")
                b = (arr > 0).astype(np.int64) << i
                bits = b if bits is None else bits | b
            try:
                from_masks = encode_bits(bits, task)
            except ValueError as e:
                raise CaseError(case, os.path.dirname(masks[STRUCTURES[task][0]]), str(e)) from None
        if label_map is not None:
            arr, loaded = _load_label(case, label_map, images[0], reference, tolerance, "label map")
            check_label_values(case, label_map, arr, range(len(CLASSES[task]) + 1), "label map")
            if from_masks is not None and not np.array_equal(arr, from_masks):
                wrong = [s for (s, a), (_, b) in zip(iter_decoded(arr, task), iter_decoded(from_masks, task))
                         if not np.array_equal(a, b)]
                raise CaseError(case, label_map, f"the label map disagrees with the masks of {', '.join(wrong)}")
            place_sitk_file(case, label_map, os.path.join(dataset_dir, label_out), reference, tolerance, images[0],
                            loaded=loaded, what="label map", reference_what="non-contrast CT image")
        else:
            write_sitk(reference.apply(sitk.GetImageFromArray(from_masks)), os.path.join(dataset_dir, label_out))
    for i, (src, dst) in enumerate(zip(images, image_out)):
        place_sitk_file(case, src, os.path.join(dataset_dir, dst), reference if i else None, tolerance, images[0],
                        what=("non-contrast CT image", "contrast CT image")[i],
                        reference_what="non-contrast CT image")


def convert(release_dir: str, task: int = 1, raw: str | None = None, dataset_id: int | None = None,
            name: str | None = None, labels: str = "auto", check_masks: bool = False, num_processes: int = 1,
            overwrite: bool = False, tolerance: float = DEFAULT_GEOMETRY_TOLERANCE, progress: bool = True) -> str:
    """Convert the SegRap2023 release for task 1 (OARs) or 2 (GTVs).

    ``labels``: ``map`` (the shipped label maps), ``masks`` (build the map from the binary masks) or ``auto``
    (maps where the folder exists, masks otherwise). ``check_masks`` also verifies every shipped map against the
    masks.
    """
    _check_task(task)
    if labels not in ("auto", "map", "masks"):
        raise ChallengeError(f"labels must be auto, map or masks, got {labels!r}")
    train_dir, cases = find_release(release_dir)
    map_dir = os.path.join(os.path.dirname(os.path.abspath(train_dir)), MAP_FOLDER, MAP_SUBFOLDERS[task])
    if labels == "map" and not os.path.isdir(map_dir):
        raise ReleaseLayoutError(f"label map folder not found: {map_dir}")
    use_map = labels == "map" or (labels == "auto" and os.path.isdir(map_dir))
    jobs = []
    for case in cases:
        images = [os.path.join(train_dir, case, f) for f in IMAGE_FILES]
        for i, path in enumerate(images):
            if not os.path.isfile(path):
                raise CaseError(case, path, f"missing {('non-contrast', 'contrast')[i]} CT channel")
        label_map = os.path.join(map_dir, f"{case}.nii.gz") if use_map else None
        if label_map is not None and not os.path.isfile(label_map):
            raise CaseError(case, label_map, f"missing label map ({MAP_SUBFOLDERS[task]})")
        masks = None
        if not use_map or check_masks:
            masks = {s: os.path.join(train_dir, case, f"{s}.nii.gz") for s in STRUCTURES[task]}
            for s, path in masks.items():
                if not os.path.isfile(path):
                    raise CaseError(case, path, f"missing mask of {s}")
        image_out = [os.path.join("imagesTr", f"{case}_{c:04d}.nii.gz") for c in range(2)]
        label_out = os.path.join("labelsTr", f"{case}.nii.gz")
        jobs.append(CaseJob(case, convert_case,
                            {"case": case, "images": images, "label_map": label_map, "masks": masks, "task": task,
                             "check_masks": check_masks, "tolerance": tolerance, "image_out": image_out,
                             "label_out": label_out}, image_out + [label_out],
                            images + ([label_map] if label_map else []) + list((masks or {}).values())))
    num_training = len(jobs)
    parent = os.path.dirname(os.path.abspath(train_dir))
    for folder in sorted(os.listdir(parent)):
        vdir = os.path.join(parent, folder)
        if not folder.startswith(VALIDATION_PREFIX) or not os.path.isdir(vdir):
            continue
        for case in sorted(d for d in os.listdir(vdir) if CASE_PATTERN.match(d)):
            images = [os.path.join(vdir, case, f) for f in IMAGE_FILES]
            for i, path in enumerate(images):
                if not os.path.isfile(path):
                    raise CaseError(case, path, f"missing {('non-contrast', 'contrast')[i]} CT channel")
            image_out = [os.path.join("imagesTs", f"{case}_{c:04d}.nii.gz") for c in range(2)]
            jobs.append(CaseJob(case, convert_case,
                                {"case": case, "images": images, "label_map": None, "masks": None, "task": task,
                                 "check_masks": False, "tolerance": tolerance, "image_out": image_out,
                                 "label_out": None}, image_out, images))
    dj = {
        "channel_names": {"0": "CT", "1": "CT"},
        "labels": labels_json(task),
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": DEFAULT_NAMES[task],
        "reference": "https://segrap2023.grand-challenge.org/",
        "description": f"SegRap2023 task {task} converted by nnunet-plugins; channel 0 non-contrast CT, 1 contrast "
                       f"CT; labels from the {'shipped label maps' if use_map else 'organ masks'}",
        "conversion": {"tool": "nnunet-plugins", "challenge": CHALLENGE, "task": task,
                       "labels": "map" if use_map else "masks", "check_masks": check_masks},
    }
    return build_dataset(raw, dataset_id or DEFAULT_DATASET_IDS[task], name or DEFAULT_NAMES[task], jobs, dj,
                         release_dir, num_processes=num_processes, overwrite=overwrite, progress=progress)


# ------------------------------------------------------------------------------------------- export

def reference_images(images: str) -> dict:
    """{case: non-contrast CT} from release case folders, a grand-challenge input folder or an nnU-Net image
    folder (``case_0000.nii.gz``)."""
    if os.path.isdir(os.path.join(images, GC_INPUTS[0])):
        return dict(list_images(os.path.join(images, GC_INPUTS[0]), (".mha",)))
    try:
        folder, cases = find_release(images)
        return {c: os.path.join(folder, c, IMAGE_FILES[0]) for c in cases}
    except ReleaseLayoutError:
        pass
    refs = {}
    for stem, path in list_images(images).items():
        if stem.endswith("_0001"):
            continue
        refs[stem[:-5] if stem.endswith("_0000") else stem] = path
    if not refs:
        raise ReleaseLayoutError(f"no SegRap2023 images in {images}")
    return refs


def four_d_image(masks: list, geometry: Geometry):
    """4-D uint8 image [len(masks), Z, Y, X] with the 3-D geometry extended by a unit fourth axis."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(np.stack([np.asarray(m, dtype=np.uint8) for m in masks]), isVector=False)
    img.SetSpacing(tuple(geometry.spacing) + (1.0,))
    img.SetOrigin(tuple(geometry.origin) + (0.0,))
    d = np.eye(4)
    d[:3, :3] = np.asarray(geometry.direction).reshape(3, 3)
    img.SetDirection(tuple(d.ravel()))
    return img


def export_case(case: str, prediction: str, reference: str, task: int, out_format: str, out_dir: str,
                tolerance: float) -> list:
    import SimpleITK as sitk
    ref = Geometry.read(case, reference)
    pred = read_sitk(case, prediction, "prediction")
    check_geometry(case, reference, ref, prediction, Geometry.of(pred), tolerance, "prediction", "input image")
    arr = sitk.GetArrayFromImage(pred)
    check_label_values(case, prediction, arr, range(len(CLASSES[task]) + 1), "prediction")
    if out_format == "grand-challenge":
        path = os.path.join(out_dir, GC_OUTPUTS[task], f"{case}.mha")
        write_sitk(four_d_image([m for _, m in iter_decoded(arr, task)], ref), path)
        return [path]
    written = []
    for s, mask in iter_decoded(arr, task):
        path = os.path.join(out_dir, case, f"{s}.nii.gz")
        if reference.endswith((".nii", ".nii.gz")):
            write_like(case, reference, mask, path)
        else:
            write_sitk(ref.apply(sitk.GetImageFromArray(mask.astype(np.uint8))), path)
        written.append(path)
    return written


def export(pred_dir: str, out_dir: str, images: str, task: int = 1, out_format: str = "validation",
           archive: str | None = "auto", num_processes: int = 1, tolerance: float = DEFAULT_GEOMETRY_TOLERANCE,
           progress: bool = True, allow_extra: bool = False) -> dict:
    """nnU-Net predictions (label maps) -> SegRap2023 submission.

    ``out_format='validation'``: ``out_dir/<case>/<Organ>.nii.gz`` (uint8 0/1, the image's geometry) and the zip
    of it (``archive``; ``auto`` = ``out_dir/segrap2023_task{task}_validation.zip``, None = none).
    ``out_format='grand-challenge'``: the test-phase output, one 4-D .mha per case in
    ``out_dir/images/head-neck-segmentation/`` (task 1) or ``.../gross-tumor-volume-segmentation/`` (task 2).
    """
    _check_task(task)
    if out_format not in ("validation", "grand-challenge"):
        raise ChallengeError(f"format must be validation or grand-challenge, got {out_format!r}")
    refs = reference_images(images)
    preds = list_images(pred_dir)
    check_complete(refs, preds, f"SegRap2023 task {task} predictions", pred_dir)
    check_extra(preds, refs, "input image", pred_dir, allow_extra)
    prepare_output_folder(out_dir)
    items = [(c, {"case": c, "prediction": preds[c], "reference": r, "task": task, "out_format": out_format,
                  "out_dir": out_dir, "tolerance": tolerance}) for c, r in refs.items()]
    written = run_parallel(export_case, items, num_processes, desc="exporting SegRap2023",
                           progress=progress)
    result = {"files": [p for c in refs for p in written[c]]}
    if archive and out_format == "validation":
        zip_path = os.path.join(out_dir, f"segrap2023_task{task}_validation.zip") if archive == "auto" else archive
        result["archive"] = write_zip([(os.path.relpath(p, out_dir), p) for p in result["files"]], zip_path)
    return result


# ------------------------------------------------------------------------------------------- the table entry

def evaluate(pred: str, gt: str, **options) -> dict:
    """:func:`nnunet_plugins.evaluation.segrap2023.evaluate` (imported on use: it needs scipy)."""
    from nnunet_plugins.evaluation import segrap2023 as evaluation
    return evaluation.evaluate(pred, gt, **options)


_TASK = "1 = organs at risk, 2 = GTVs (default 1)"
SPEC = Challenge(
    name=CHALLENGE, title="SegRap2023", convert=convert, export=export, evaluate=evaluate,
    default_dataset="601 (task 1) / 602 (task 2)",
    convert_options=(
        Option(("--task",), "task", _TASK, default=1, type=int, choices=(1, 2)),
        Option(("--segrap-labels",), "labels", "labels from the shipped label maps, from the organ masks, or auto "
               "(maps if present; default auto)", default="auto", choices=("auto", "map", "masks")),
        Option(("--check-masks",), "check_masks", "also check every shipped label map against the organ masks",
               flag=True)),
    export_options=(
        Option(("--task",), "task", _TASK, default=1, type=int, choices=(1, 2)),
        Option(("--format",), "out_format", "per-organ validation layout + zip, or the test-phase 4-D .mha "
               "(default validation)", default="validation", choices=("validation", "grand-challenge")),
        *archive_options("segrap2023_task<T>_validation.zip")),
    evaluate_options=(
        Option(("--task",), "task", _TASK, default=1, type=int, choices=(1, 2)),
        Option(("--no-round",), "round_decimals", "keep full precision (the official script rounds per-case values "
               "to 4 decimals)", flag=True, to_param=lambda v: None if v else 4),
        ignore_geometry_option("it compares arrays, spacing of the reference")),
)
