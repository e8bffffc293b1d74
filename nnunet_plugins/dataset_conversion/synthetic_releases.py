"""Small synthetic challenge releases in each challenge's exact layout, for tests and demos.

No challenge release can be downloaded where this package is developed, so each generator writes a few tiny
cases with the release's folder and file names, channels, label values, data types and geometry conventions:

* KiTS21: ``case_XXXXX`` folders with imaging (int16 HU), aggregated MAJ/AND/OR segmentations painted in the
  order kidney, cyst, tumor, per-instance annotation files of three annotators and ``segmentation_samples``
  groups built from them; arrays (slices, H, W) with the KiTS affine (no canonical orientation, origin 0).
* AMOS22: ``dataset.json`` with training/validation/test lists, CT cases numbered <= 500 and MRI cases above,
  MRI cases with oblique affines; some organs absent in some cases.
* SegRap2023: 54-class maps and the 45 overlapping organ masks decoded from them (so both agree), GTV masks and
  their 2-class maps, non-contrast and contrast CT.
* MyoPS2020: C0/DE/T2 volumes of a few thick slices, labels with the original values 200/500/600/1220/2221.
* KiPA22: uint16 CTA with an intensity offset, labels 1-4, an open test set.

The images carry structure-dependent intensities plus noise (learnable by a short nnU-Net run).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from .common import ChallengeError, write_sitk

CHALLENGES = ("kits21", "amos22", "segrap2023", "myops2020", "kipa22")


def _ellipsoid(shape, center, radii) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii))
    return d <= 1.0


def _sitk_image(array, spacing_zyx, origin=(0.0, 0.0, 0.0), direction=None):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    return img


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _prepare(out_dir: str, overwrite: bool) -> str:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ChallengeError(f"{out_dir} exists and is not empty; use --overwrite to replace it")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


# ------------------------------------------------------------------------------------------------ KiTS21

def _kits_affine(spacing_slices_h_w) -> np.ndarray:
    s_slice, s_h, s_w = spacing_slices_h_w
    return np.array([[0.0, 0.0, -s_w, 0.0], [0.0, -s_h, 0.0, 0.0], [-s_slice, 0.0, 0.0, 0.0], [0, 0, 0, 1.0]])


def kits21(out_dir: str, num_cases: int = 3, shape=(16, 32, 32), spacing=(3.0, 0.8, 0.8), num_groups: int = 2,
           seed: int = 0, overwrite: bool = False) -> str:
    """Write ``out_dir/case_XXXXX/...`` (the layout of ``kits21/data``). Returns ``out_dir``."""
    import nibabel
    from .kits21 import LABEL_AGGREGATION_ORDER

    out_dir = _prepare(out_dir, overwrite)
    rng = np.random.default_rng(seed)
    affine = _kits_affine(spacing)
    z, h, w = shape
    for i in range(num_cases):
        case = f"case_{i:05d}"
        cdir = os.path.join(out_dir, case)
        seg_dir = os.path.join(cdir, "segmentations")
        os.makedirs(seg_dir)
        # instances: two kidneys, a tumour in the first, a cyst in the second (not in every case)
        kid_centres = [(z / 2, h / 2, w * 0.28), (z / 2, h / 2, w * 0.72)]
        kid_radii = (z * 0.3, h * 0.28, w * 0.17)
        instances = {"kidney": [], "tumor": [], "cyst": []}
        for c in kid_centres:
            instances["kidney"].append((c, kid_radii))
        instances["tumor"].append(((kid_centres[0][0] + 1, kid_centres[0][1] - 2, kid_centres[0][2]),
                                   (z * 0.15, h * 0.12, w * 0.08)))
        if i % 3 != 2:
            instances["cyst"].append(((kid_centres[1][0], kid_centres[1][1] + 2, kid_centres[1][2]),
                                      (z * 0.12, h * 0.1, w * 0.07)))
        annotations = {}   # (structure, instance) -> list of masks, one per annotator
        for structure, insts in instances.items():
            for k, (centre, radii) in enumerate(insts, start=1):
                masks = []
                for a in range(3):
                    jitter = rng.uniform(-0.8, 0.8, 3)
                    scale = rng.uniform(0.9, 1.1, 3)
                    m = _ellipsoid(shape, np.add(centre, jitter), np.multiply(radii, scale))
                    masks.append(m)
                    nibabel.save(nibabel.Nifti1Image(m.astype(np.uint8), affine),
                                 os.path.join(seg_dir, f"{structure}_instance-{k}_annotation-{a + 1}.nii.gz"))
                annotations[(structure, k)] = masks
        label_values = {"kidney": 1, "tumor": 2, "cyst": 3}

        def aggregate(rule):
            seg = np.zeros(shape, dtype=np.uint8)
            for value in LABEL_AGGREGATION_ORDER:
                structure = [s for s, v in label_values.items() if v == value][0]
                for (s, _), masks in annotations.items():
                    if s == structure:
                        votes = np.sum(masks, axis=0)
                        seg[rule(votes, len(masks))] = value
            return seg

        rules = {"MAJ": lambda v, n: v * 2 > n, "AND": lambda v, n: v == n, "OR": lambda v, n: v > 0}
        segs = {name: aggregate(rule) for name, rule in rules.items()}
        for name, seg in segs.items():
            nibabel.save(nibabel.Nifti1Image(seg, affine), os.path.join(cdir, f"aggregated_{name}_seg.nii.gz"))
        # segmentation samples: in each group, the i-th sample takes annotation (offset + i) of every instance
        for g in range(num_groups):
            gdir = os.path.join(cdir, "segmentation_samples", f"group_{g}")
            os.makedirs(gdir)
            offsets = {key: int(rng.integers(0, 3)) for key in annotations}
            for s_i in range(3):
                seg = np.zeros(shape, dtype=np.uint8)
                name = ""
                chosen = {key: (offsets[key] + s_i) % 3 for key in annotations}
                for value in LABEL_AGGREGATION_ORDER:
                    structure = [s for s, v in label_values.items() if v == value][0]
                    for (s, k), masks in annotations.items():
                        if s == structure:
                            seg[masks[chosen[(s, k)]]] = value
                for structure in ("kidney", "cyst", "tumor"):
                    name += ("_" if name else "") + structure
                    for (s, k) in annotations:
                        if s == structure:
                            name += f"_i{k}a{chosen[(s, k)] + 1}"
                nibabel.save(nibabel.Nifti1Image(seg, affine), os.path.join(gdir, name + ".nii.gz"))
        maj = segs["MAJ"]
        means = np.array([-80.0, 180.0, 90.0, 10.0])
        image = means[maj] + rng.normal(0, 20, shape)
        image[:, :, :2] = -1000.0   # air at the border
        nibabel.save(nibabel.Nifti1Image(np.round(image).astype(np.int16), affine),
                     os.path.join(cdir, "imaging.nii.gz"))
    return out_dir


def kits21_container_input(data_dir: str, input_dir: str, cases=None) -> list:
    """The grand-challenge input for KiTS21 cases: ``input_dir/images/ct/<case>.mha`` as the organisers derive
    it from the NIfTI (last array axis of the .mha = first axis of the NIfTI, spacing from the affine)."""
    import nibabel
    import SimpleITK as sitk
    from .kits21 import INPUT_SUBDIR

    written = []
    cases = cases or sorted(d for d in os.listdir(data_dir) if d.startswith("case_"))
    for case in cases:
        nii = nibabel.load(os.path.join(data_dir, case, "imaging.nii.gz"))
        array = np.moveaxis(np.asanyarray(nii.dataobj), 0, -1)
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(float(s) for s in nii.header.get_zooms()))
        img.SetOrigin((12.5, -40.0, 3.0))   # grand-challenge files carry their own origin
        path = os.path.join(input_dir, INPUT_SUBDIR, f"{case}.mha")
        write_sitk(img, path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ AMOS22

AMOS_SPLITS = {"training": ([1, 4, 5], [507, 508]), "validation": ([8], [510]), "test": ([11], [512])}


def amos22(out_dir: str, shape=(16, 32, 32), seed: int = 0, splits=None, overwrite: bool = False) -> str:
    """Write an AMOS22 release (``dataset.json``, imagesTr/labelsTr/imagesVa/labelsVa/imagesTs). CT cases are
    numbered <= 500, MRI cases above; MRI cases 507 (training) and 510 (validation) have oblique affines."""
    import nibabel
    from .amos22 import LABELS, LAST_CT_ID

    out_dir = _prepare(out_dir, overwrite)
    rng = np.random.default_rng(seed)
    splits = splits or AMOS_SPLITS
    folders = {"training": ("imagesTr", "labelsTr"), "validation": ("imagesVa", "labelsVa"), "test": ("imagesTs", None)}
    shipped = {"name": "AMOS", "description": "synthetic AMOS22 release", "licence": "CC-BY-SA (synthetic)",
               "labels": {str(k): v for k, v in LABELS.items()}, "modality": {"0": "CT"},
               "numTraining": 0, "numValidation": 0, "numTest": 0, "training": [], "validation": [], "test": []}
    z, h, w = shape
    for split, (ct_ids, mr_ids) in splits.items():
        img_folder, lbl_folder = folders[split]
        for number in list(ct_ids) + list(mr_ids):
            case = f"amos_{number:04d}"
            is_ct = number <= LAST_CT_ID
            label = np.zeros(shape, dtype=np.uint8)
            # organs on a 3 x 5 grid of small ellipsoids; prostate/uterus (15) and a few others absent at times
            present = [k for k in range(1, 16) if not (k == 15 and not is_ct) and not (k == 14 and number % 2)]
            for k in present:
                row, col = divmod(k - 1, 5)
                centre = (z / 2 + rng.uniform(-1, 1), (row + 0.5) * h / 3, (col + 0.5) * w / 5)
                label[_ellipsoid(shape, centre, (z * 0.3, h / 8, w / 13))] = k
            if is_ct:
                image = (-100.0 + 15.0 * label + rng.normal(0, 15, shape)).round().astype(np.int16)
                zooms = (0.8, 0.8, 2.5)
                direction = np.diag([-1.0, -1.0, 1.0])
            else:
                image = (200.0 + 40.0 * label + rng.normal(0, 25, shape)).astype(np.float32)
                zooms = (1.2, 1.2, 3.0)
                direction = {507: _rotation(0, 25.0) @ _rotation(2, 10.0), 510: _rotation(1, -20.0)}.get(
                    number, np.diag([1.0, -1.0, 1.0]))
            affine = np.eye(4)
            affine[:3, :3] = direction @ np.diag(zooms)
            affine[:3, 3] = rng.uniform(-150, 150, 3)
            # nibabel arrays are (x, y, z); the label was drawn as (z, y, x)
            for array, folder, name in ((image, img_folder, "image"), (label, lbl_folder, "label")):
                if folder is None:
                    continue
                os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
                nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine),
                             os.path.join(out_dir, folder, f"{case}.nii.gz"))
            entry = {"image": f"./{img_folder}/{case}.nii.gz"}
            if lbl_folder:
                entry["label"] = f"./{lbl_folder}/{case}.nii.gz"
            shipped[split].append(entry)
    shipped["numTraining"], shipped["numValidation"], shipped["numTest"] = (
        len(shipped["training"]), len(shipped["validation"]), len(shipped["test"]))
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(shipped, f, indent=2)
    return out_dir


# ------------------------------------------------------------------------------------------------ SegRap2023

def segrap2023(out_dir: str, num_cases: int = 2, shape=(16, 32, 32), spacing=(3.0, 0.9, 0.9),
               num_validation: int = 0, seed: int = 0, overwrite: bool = False) -> str:
    """Write a SegRap2023 release (training cases with images, 45 organ masks and GTVs; the label-map folder).

    The 54-class map is drawn first (classes in boxes of the volume, several boxes each) and the organ masks
    are decoded from it, so masks overlap as in the release (e.g. TemporalLobe_L and Hippocampus_L share class 6,
    Brain covers classes 1-9) and agree with the map.
    """
    import SimpleITK as sitk
    from .segrap2023 import (CLASS_ORGANS, GTVS, MAP_FOLDER, MAP_SUBFOLDERS, TRAINING_FOLDER, VALIDATION_PREFIX,
                             decode)

    out_dir = _prepare(out_dir, overwrite)
    rng = np.random.default_rng(seed)
    cell = (4, 4, 4)
    grid = tuple(s // c for s, c in zip(shape, cell))
    n_cells = int(np.prod(grid))
    if n_cells < len(CLASS_ORGANS) + 4:
        raise ChallengeError(f"shape {shape} is too small for the 54 SegRap classes (need {len(CLASS_ORGANS) + 4} "
                             "cells of 4x4x4 voxels)")
    train_dir = os.path.join(out_dir, TRAINING_FOLDER)
    map_dirs = {t: os.path.join(out_dir, MAP_FOLDER, MAP_SUBFOLDERS[t]) for t in (1, 2)}
    for d in (train_dir, *map_dirs.values()):
        os.makedirs(d)
    origin_base = np.array([-120.0, -150.0, -300.0])

    def case_images(label_map, gtv_map):
        base = -50.0 + 12.0 * (label_map % 7) + 60.0 * (gtv_map > 0)
        ct = (base + rng.normal(0, 12, shape)).round().astype(np.int16)
        contrast = (base * 1.3 + 40.0 * (label_map % 3) + rng.normal(0, 12, shape)).round().astype(np.int16)
        return ct, contrast

    def draw_maps():
        cells = rng.permutation(n_cells)
        label_map = np.zeros(shape, dtype=np.uint8)
        gtv_map = np.zeros(shape, dtype=np.uint8)
        assignments = list(range(1, len(CLASS_ORGANS) + 1))
        for value, c in zip(assignments, cells):
            idx = np.unravel_index(c, grid)
            sl = tuple(slice(i * s, (i + 1) * s) for i, s in zip(idx, cell))
            label_map[sl] = value
            # shrink some boxes so surfaces differ from the cell grid
            if value % 4 == 0:
                label_map[sl][0] = 0
        free = cells[len(assignments):]
        for value, c in zip((1, 2), free[:2]):
            idx = np.unravel_index(c, grid)
            sl = tuple(slice(i * s, (i + 1) * s) for i, s in zip(idx, cell))
            gtv_map[sl] = value
        return label_map, gtv_map

    spacing_xyz = tuple(float(s) for s in spacing[::-1])
    for i in range(num_cases):
        case = f"segrap_{i:04d}"
        cdir = os.path.join(train_dir, case)
        os.makedirs(cdir)
        label_map, gtv_map = draw_maps()
        origin = tuple(origin_base + rng.uniform(-5, 5, 3))

        def img(a):
            im = sitk.GetImageFromArray(a)
            im.SetSpacing(spacing_xyz)
            im.SetOrigin(origin)
            return im

        ct, contrast = case_images(label_map, gtv_map)
        sitk.WriteImage(img(ct), os.path.join(cdir, "image.nii.gz"), True)
        sitk.WriteImage(img(contrast), os.path.join(cdir, "image_contrast.nii.gz"), True)
        for organ, mask in decode(label_map, 1).items():
            sitk.WriteImage(img(mask.astype(np.uint8)), os.path.join(cdir, f"{organ}.nii.gz"), True)
        for k, gtv in enumerate(GTVS, start=1):
            sitk.WriteImage(img((gtv_map == k).astype(np.uint8)), os.path.join(cdir, f"{gtv}.nii.gz"), True)
        sitk.WriteImage(img(label_map), os.path.join(map_dirs[1], f"{case}.nii.gz"), True)
        sitk.WriteImage(img(gtv_map), os.path.join(map_dirs[2], f"{case}.nii.gz"), True)
    if num_validation:
        vdir = os.path.join(out_dir, f"{VALIDATION_PREFIX}_20cases")
        for i in range(num_cases, num_cases + num_validation):
            case = f"segrap_{i:04d}"
            os.makedirs(os.path.join(vdir, case))
            label_map, gtv_map = draw_maps()
            ct, contrast = case_images(label_map, gtv_map)
            for a, name in ((ct, "image.nii.gz"), (contrast, "image_contrast.nii.gz")):
                im = sitk.GetImageFromArray(a)
                im.SetSpacing(spacing_xyz)
                sitk.WriteImage(im, os.path.join(vdir, case, name), True)
    return out_dir


def segrap2023_container_input(images: dict, input_dir: str) -> list:
    """Grand-challenge input for one SegRap case: ``{uuid: (non-contrast, contrast)}`` NIfTI files ->
    ``input_dir/images/head-neck-ct/<uuid>.mha`` and ``.../head-neck-contrast-enhanced-ct/<uuid>.mha``."""
    import SimpleITK as sitk
    from .segrap2023 import GC_INPUTS
    written = []
    for uuid, pair in images.items():
        for src, sub in zip(pair, GC_INPUTS):
            path = os.path.join(input_dir, sub, f"{uuid}.mha")
            write_sitk(sitk.ReadImage(src), path)
            written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ MyoPS2020

def myops2020(out_dir: str, train_ids=(101, 102, 103), test_ids=(201,), shape=(4, 32, 32),
              spacing=(12.0, 1.4, 1.4), seed: int = 0, overwrite: bool = False) -> str:
    """Write train25/, train25_myops_gd/ and test20/ with thick-slice C0/DE/T2 volumes (aligned) and labels
    200/500/600/1220/2221."""
    out_dir = _prepare(out_dir, overwrite)
    rng = np.random.default_rng(seed)
    z, h, w = shape
    direction = _rotation(2, 30.0) @ _rotation(0, -15.0)

    def case(case_name, folder, label_folder):
        grids = np.ogrid[0:z, 0:h, 0:w]
        cy, cx = h / 2 + rng.uniform(-1, 1), w / 2 + rng.uniform(-1, 1)
        r = np.sqrt((grids[1] - cy) ** 2 + (grids[2] - cx) ** 2) * np.ones((z, 1, 1))
        ang = np.arctan2(grids[1] - cy, grids[2] - cx) * np.ones((z, 1, 1))
        label = np.zeros(shape, dtype=np.uint16)
        label[r < 5] = 500                                     # LV blood pool
        myo = (r >= 5) & (r < 8)
        label[myo] = 200                                       # normal myocardium
        label[myo & (ang > 0.3) & (ang < 1.5)] = 1220          # edema
        label[myo & (ang > 0.6) & (ang < 1.1)] = 2221          # scar inside the edema
        rv = _ellipsoid(shape, (z / 2, cy, cx - 11), (z, 6, 3.5)) & (r >= 8)
        label[rv] = 600                                        # RV blood pool
        means = {"C0": {0: 50, 500: 300, 200: 120, 1220: 130, 2221: 140, 600: 280},
                 "DE": {0: 40, 500: 200, 200: 60, 1220: 90, 2221: 320, 600: 180},
                 "T2": {0: 60, 500: 150, 200: 90, 1220: 210, 2221: 200, 600: 140}}
        origin = tuple(rng.uniform(-100, 100, 3))
        for seq, table in means.items():
            image = np.zeros(shape, dtype=np.float32)
            for value, mean in table.items():
                image[label == value] = mean
            image += rng.normal(0, 15, shape)
            write_sitk(_sitk_image(np.clip(image, 0, None).astype(np.int16), spacing, origin, direction),
                       os.path.join(out_dir, folder, f"{case_name}_{seq}.nii.gz"))
        if label_folder:
            write_sitk(_sitk_image(label, spacing, origin, direction),
                       os.path.join(out_dir, label_folder, f"{case_name}_gd.nii.gz"))

    for i in train_ids:
        case(f"myops_training_{i}", "train25", "train25_myops_gd")
    for i in test_ids:
        case(f"myops_test_{i}", "test20", None)
    return out_dir


# ------------------------------------------------------------------------------------------------ KiPA22

def kipa22(out_dir: str, train_ids=(0, 1, 2), test_ids=(70,), shape=(16, 32, 32), spacing=(0.5, 0.7, 0.7),
           offset: int = 1024, seed: int = 0, overwrite: bool = False) -> str:
    """Write train/image, train/label and test/image with uint16 CTA (HU + ``offset``) and labels 1-4."""
    out_dir = _prepare(out_dir, overwrite)
    rng = np.random.default_rng(seed)
    z, h, w = shape
    for split, ids in (("train", train_ids), ("test", test_ids)):
        for i in ids:
            label = np.zeros(shape, dtype=np.uint8)
            label[_ellipsoid(shape, (z / 2, h / 2, w / 2 + rng.uniform(-1, 1)), (z * 0.35, h * 0.3, w * 0.2))] = 2
            label[_ellipsoid(shape, (z / 2 + 2, h / 2 - 3, w / 2 + 3), (z * 0.15, h * 0.12, w * 0.1))] = 4
            label[:, int(h * 0.3):int(h * 0.3) + 2, int(w * 0.1):int(w * 0.4)] = 1        # vein
            z0, y0 = int(z * 0.6), int(h * 0.6)
            label[z0:z0 + 4, y0:y0 + 2, int(w * 0.1):int(w * 0.45)] = 3   # artery
            hu = np.array([-50.0, 180.0, 150.0, 350.0, 80.0])[label] + rng.normal(0, 20, shape)
            image = np.clip(hu + offset, 0, 65535).round().astype(np.uint16)
            origin = tuple(rng.uniform(-50, 50, 3))
            write_sitk(_sitk_image(image, spacing, origin), os.path.join(out_dir, split, "image", f"{i}.nii.gz"))
            if split == "train":
                write_sitk(_sitk_image(label, spacing, origin), os.path.join(out_dir, split, "label", f"{i}.nii.gz"))
    return out_dir


def _amos_splits(cases: int | None, test_cases: int | None) -> dict:
    """AMOS22 splits with ``cases`` training cases (a third MRI, the first of them oblique) and ``test_cases``
    test images; the validation split stays one CT and one oblique MRI case."""
    training, _, test = AMOS_SPLITS["training"], AMOS_SPLITS["validation"], AMOS_SPLITS["test"]
    if cases is not None:
        n_mr = max(1, cases // 3) if cases >= 2 else 0
        mr = ([507] + list(range(600, 600 + n_mr - 1)))[:n_mr]
        training = (list(range(100, 100 + cases - n_mr)), mr)
    if test_cases is not None:
        n_mr = 1 if test_cases >= 2 else 0
        test = (list(range(11, 11 + test_cases - n_mr)), [512][:n_mr])
    return {"training": training, "validation": AMOS_SPLITS["validation"], "test": test}


def generate(challenge: str, out_dir: str, seed: int = 0, overwrite: bool = False, cases: int | None = None,
             test_cases: int | None = None, shape=None, **kwargs) -> str:
    """Write a synthetic release of ``challenge`` to ``out_dir``: ``cases`` training cases, ``test_cases`` test (or
    validation) images without labels, volumes of ``shape`` (z, y, x) voxels (None: the generator's default)."""
    generators = {"kits21": kits21, "amos22": amos22, "segrap2023": segrap2023, "myops2020": myops2020,
                  "kipa22": kipa22}
    if challenge not in generators:
        raise ChallengeError(f"unknown challenge {challenge!r}; choose from {', '.join(CHALLENGES)}")
    for name, n in (("cases", cases), ("test cases", test_cases)):
        if n is not None and n < (1 if name == "cases" else 0):
            raise ChallengeError(f"number of {name} must be at least {1 if name == 'cases' else 0}, got {n}")
    if shape is not None:
        if len(shape) != 3 or min(shape) < 1:
            raise ChallengeError(f"shape must be three positive sizes (z, y, x), got {tuple(shape)}")
        kwargs["shape"] = tuple(int(s) for s in shape)
    if challenge == "kits21":
        if test_cases:
            raise ChallengeError("the KiTS21 release has no test images; leave out --test-cases")
        if cases is not None:
            kwargs["num_cases"] = cases
    elif challenge == "amos22":
        kwargs["splits"] = _amos_splits(cases, test_cases)
    elif challenge == "segrap2023":
        kwargs.update({k: v for k, v in (("num_cases", cases), ("num_validation", test_cases)) if v is not None})
    else:
        first_train, first_test = {"myops2020": (101, 201), "kipa22": (0, 70)}[challenge]
        if cases is not None:
            kwargs["train_ids"] = tuple(range(first_train, first_train + cases))
        if test_cases is not None:
            kwargs["test_ids"] = tuple(range(first_test, first_test + test_cases))
    return generators[challenge](out_dir, seed=seed, overwrite=overwrite, **kwargs)
