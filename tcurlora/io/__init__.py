"""Reading and writing images, label maps and Slicer segmentations; finding (image, label) cases.

* :mod:`.images` — images (NIfTI, NRRD, MHA/MHD, DICOM series): read with their checks, written;
* :mod:`.geometry` — whether two grids agree, and a label put exactly onto its image's grid;
* :mod:`.segmentations` — label maps and Slicer ``.seg.nrrd`` segmentations;
* :mod:`.cases` — the (image, label) cases of a folder.

Conventions used throughout ``tcurlora``:

* Images are :class:`SimpleITK.Image` objects (physical space LPS, as ITK and DICOM use). ``read_image`` returns a
  3D single-channel float32 image with finite voxels.
* Label maps are integer ``SimpleITK.Image`` objects on the image grid; 0 is background.
* A *label table* is described in :mod:`tcurlora.labels`.
* Every user-facing problem with a file raises :class:`tcurlora.errors.InputError` naming the file.
* Every write is atomic: the file is written under a temporary name in the destination folder and renamed
  with :func:`os.replace`, so a failed or interrupted write never leaves a half-written output.
"""

from ..atomic import atomic_write
from ..labels import default_color, default_label_table
from .cases import find_cases, volume_files
from .geometry import GEOMETRY_RTOL, geometry_mismatch
from .images import (IMAGE_EXTENSIONS, LABEL_EXTENSIONS, PATH_KEY, WORKING_BYTES_PER_VOXEL, WRITE_EXTENSIONS,
                     array_to_image, available_memory, extension, pick_dicom_series, read_image, stem, write_image)
from .segmentations import (is_segmentation_file, label_table_from_segmentation, read_label, read_label_unchecked,
                            validate_label_table, write_segmentation)

__all__ = [
    "PATH_KEY", "IMAGE_EXTENSIONS", "LABEL_EXTENSIONS", "WRITE_EXTENSIONS", "extension", "stem",
    "array_to_image", "default_color", "validate_label_table", "default_label_table", "read_image",
    "geometry_mismatch", "is_segmentation_file", "read_label", "read_label_unchecked",
    "label_table_from_segmentation", "write_image", "write_segmentation", "find_cases", "volume_files",
    "pick_dicom_series", "available_memory",
]
