"""tcurlora.io: reading/writing images, label maps and Slicer segmentations on real files in tmp_path."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from tcurlora import io
from tcurlora.errors import InputError, TCURLoRAError

from conftest import CT, CT_VERT, write_dicom_series

OBLIQUE = (0.9363, -0.2896, 0.1987, 0.3130, 0.9447, -0.0978, -0.1593, 0.1538, 0.9752)  # ~20 deg rotation


def _orthonormal(d):
    u, _, vt = np.linalg.svd(np.asarray(d, dtype=float).reshape(3, 3))
    return tuple((u @ vt).ravel())


DIRECTION = _orthonormal(OBLIQUE)
TABLE = [
    {"value": 1, "name": "Liver", "color": [0.8, 0.2, 0.2]},
    {"value": 2, "name": "Spleen", "color": [0.2, 0.4, 0.9],
     "terminology": "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                    "Structure~SCT^78961009^Spleen~^^~Anatomic codes - DICOM master list~^^~^^"},
    {"value": 5, "name": "Tumor", "color": [0.9, 0.9, 0.1]},
]


def make_image(shape_zyx=(12, 14, 16), spacing=(0.8, 1.1, 2.5), origin=(10.0, -20.0, 30.0),
               direction=DIRECTION, dtype=np.float32, seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random(shape_zyx) * 100).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def make_label(image: sitk.Image, values=(1, 2)) -> sitk.Image:
    z, y, x = image.GetSize()[::-1]
    arr = np.zeros((z, y, x), np.uint8)
    if 1 in values:
        arr[2:6, 3:8, 4:10] = 1
    if 2 in values:
        arr[7:10, 2:6, 9:14] = 2
    if 5 in values:
        arr[3:5, 9:12, 2:5] = 5
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(image)
    return lab


def assert_input_error(excinfo, *names):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, msg


def write(img: sitk.Image, path) -> str:
    sitk.WriteImage(img, str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------ errors


def test_error_classes():
    assert issubclass(InputError, TCURLoRAError) and issubclass(TCURLoRAError, Exception)
    e = InputError("/a/b/label.nii.gz", "geometry does not match image.nii.gz\n(size 1x2x3 vs 1x2x4)")
    assert str(e) == "label.nii.gz: geometry does not match image.nii.gz (size 1x2x3 vs 1x2x4)"
    assert e.path == "/a/b/label.nii.gz"
    assert str(InputError("x.nii: broken")) == "x.nii: broken"


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_read_image_formats(tmp_path, ext):
    img = make_image(dtype=np.int16)
    path = write(img, tmp_path / f"scan{ext}")
    out = io.read_image(path)
    assert out.GetPixelID() == sitk.sitkFloat32
    assert io.geometry_mismatch(out, img) is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img).astype(np.float32))
    assert out.GetMetaData(io.PATH_KEY).endswith(f"scan{ext}")


def test_read_dicom_folder_with_several_series_is_refused_with_the_list_or_read_by_uid(tmp_path):
    big = make_image(shape_zyx=(9, 10, 11), spacing=(0.7, 0.7, 2.0), dtype=np.int16)
    small = make_image(shape_zyx=(3, 10, 11), spacing=(0.7, 0.7, 2.0), dtype=np.int16, seed=1)
    folder = tmp_path / "dicom"
    big_uid, small_uid = "1.2.826.0.1.3680043.2.1125.2.1111", "1.2.826.0.1.3680043.2.1125.2.2222"
    files = write_dicom_series(big, folder, big_uid)
    small_files = write_dicom_series(small, folder, small_uid, "localizer")
    # no guessing (the old reader took the series with the most files)
    with pytest.raises(InputError) as e:
        io.read_image(folder)
    assert_input_error(e, "dicom: holds 2 DICOM series", f"{big_uid} (test, 9 files)",
                       f"{small_uid} (localizer, 3 files)", "--series UID")
    for uid, volume in ((big_uid, big), (small_uid, small)):
        out = io.read_image(io.pick_dicom_series(folder, uid))
        assert out.GetSize() == volume.GetSize()
        np.testing.assert_allclose(out.GetSpacing(), volume.GetSpacing(), rtol=1e-4)
        np.testing.assert_allclose(out.GetOrigin(), volume.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(out.GetDirection(), volume.GetDirection(), atol=1e-5)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(volume))
    # One file of the series stands for the series.
    assert io.read_image(files[0]).GetSize() == big.GetSize()
    assert io.read_image(small_files[-1]).GetSize() == small.GetSize()
    with pytest.raises(InputError) as e:
        io.pick_dicom_series(folder, "1.2.3")
    assert_input_error(e, "has no DICOM series 1.2.3", big_uid, small_uid)
    assert io.pick_dicom_series(tmp_path / "scan.nii.gz", big_uid) == str(tmp_path / "scan.nii.gz")


# ------------------------------------------------------------------------------------------------ untrusted images


def _ct_copy(tmp_path, ext):
    """The real tptbox CT crop re-written as ``ext`` (73x47x73 int16)."""
    return write(sitk.ReadImage(str(CT)), tmp_path / f"ct{ext}")


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize("reader", ["image", "label"])
def test_truncated_nifti_is_refused_not_read_as_zeros(tmp_path, ext, reader):
    """ITK reads the missing half of a cut-short NIfTI file as zeros, which trained and segmented on garbage."""
    source = _ct_copy(tmp_path, ext) if reader == "image" else write(sitk.ReadImage(str(CT_VERT)), tmp_path / f"l{ext}")
    data = open(source, "rb").read()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) // 2])
    read = io.read_image if reader == "image" else (lambda p: io.read_label(p, io.read_image(CT)))
    with pytest.raises(InputError) as e:
        read(cut)
    assert_input_error(e, f"cut{ext}: ", "truncated")
    read(source)  # the whole file reads


def _nifti_header_only(path, shape, dtype=np.int16):
    """A NIfTI file holding only a header that claims ``shape`` voxels (plus a few data bytes)."""
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    blob = header.binaryblock + b"\0" * 4 + b"\1" * 1000
    path.write_bytes(gzip.compress(blob) if str(path).endswith(".gz") else blob)
    return path


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_small_file_claiming_a_big_volume_is_refused_from_its_header(tmp_path, ext):
    path = _nifti_header_only(tmp_path / f"claims{ext}", (512, 512, 400))
    assert path.stat().st_size < 1400
    with pytest.raises(InputError) as e:
        io.read_image(path)
    assert_input_error(e, f"claims{ext}: ", "truncated")


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz", "huge.nrrd", "huge.seg.nrrd"])
def test_absurd_volume_size_is_refused_before_allocating(tmp_path, name):
    path = tmp_path / name
    if name == "huge.seg.nrrd":  # a gzip bomb: 40 bytes of data that would decompress to 32767^3 voxels
        import gzip

        path.write_bytes(b"NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: 32767 32767 32767\n"
                         b"encoding: gzip\nSegment0_ID:=Segment_1\nSegment0_Name:=a\nSegment0_LabelValue:=1\n"
                         b"Segment0_Layer:=0\n\n" + gzip.compress(b"\0" * 4096))
    elif name.endswith(".nrrd"):
        path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 32767 32767 32767\nencoding: raw\n"
                         b"endian: little\n\n" + b"\0" * 64)
    else:
        _nifti_header_only(path, (32767, 32767, 32767))
    for read in (io.read_image, lambda p: io.read_label(p, io.read_image(CT))):
        with pytest.raises(InputError) as e:
            read(path)
        assert_input_error(e, f"{name}: ", "of 32767x32767x32767 voxels needs about", "GB of memory", "available")


def test_memory_limit_follows_the_available_memory(tmp_path, monkeypatch):
    path = _ct_copy(tmp_path, ".nii.gz")
    voxels = 73 * 47 * 73
    need = voxels * (2 + io.WORKING_BYTES_PER_VOXEL)
    from tcurlora import limits

    monkeypatch.setattr(limits, "available_memory", lambda: need - 1)
    with pytest.raises(InputError) as e:
        io.read_image(path)
    assert_input_error(e, "ct.nii.gz: ", "73x47x73 voxels needs about", "crop or downsample")
    monkeypatch.setattr(limits, "available_memory", lambda: need)
    assert io.read_image(path).GetSize() == (73, 47, 73)
    # the real figure: this machine has memory to spare for the CT crop, and not for 32767^3
    assert 0 < io.available_memory()


def test_read_dicom_empty_folder(tmp_path):
    (tmp_path / "nodicom").mkdir()
    with pytest.raises(InputError) as e:
        io.read_image(tmp_path / "nodicom")
    assert_input_error(e, "nodicom", "no DICOM series")


def test_read_image_missing(tmp_path):
    with pytest.raises(InputError) as e:
        io.read_image(tmp_path / "nothere.nii.gz")
    assert_input_error(e, "nothere.nii.gz", "not found")


def test_read_image_garbage(tmp_path):
    p = tmp_path / "broken.nii.gz"
    p.write_bytes(b"this is not an image")
    with pytest.raises(InputError) as e:
        io.read_image(p)
    assert_input_error(e, "broken.nii.gz")


def test_read_image_2d(tmp_path):
    path = write(sitk.GetImageFromArray(np.zeros((10, 12), np.float32)), tmp_path / "flat.nii.gz")
    with pytest.raises(InputError) as e:
        io.read_image(path)
    assert_input_error(e, "flat.nii.gz", "2D")


def test_read_image_single_slice(tmp_path):
    path = write(sitk.GetImageFromArray(np.zeros((1, 10, 12), np.float32)), tmp_path / "slice.nrrd")
    with pytest.raises(InputError) as e:
        io.read_image(path)
    assert_input_error(e, "slice.nrrd", "2D")


def test_read_image_4d(tmp_path):
    vol = make_image()
    path = write(sitk.JoinSeries([vol, vol, vol]), tmp_path / "dynamic.nii.gz")
    with pytest.raises(InputError) as e:
        io.read_image(path)
    assert_input_error(e, "dynamic.nii.gz", "4D")


def test_read_image_vector(tmp_path):
    arr = np.zeros((6, 7, 8, 3), np.float32)
    path = write(sitk.GetImageFromArray(arr, isVector=True), tmp_path / "rgb.mha")
    with pytest.raises(InputError) as e:
        io.read_image(path)
    assert_input_error(e, "rgb.mha", "3 components")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_read_image_nan(tmp_path, bad):
    arr = np.ones((6, 7, 8), np.float32)
    arr[2, 3, 4] = bad
    path = write(sitk.GetImageFromArray(arr), tmp_path / "nan.nrrd")
    with pytest.raises(InputError) as e:
        io.read_image(path)
    assert_input_error(e, "nan.nrrd", "NaN")


# ------------------------------------------------------------------------------------------------ labels


def test_read_plain_label(tmp_path):
    img = make_image()
    lab = make_label(img, (1, 2, 5))
    path = write(lab, tmp_path / "case_label.nii.gz")
    out = io.read_label(path, img, TABLE)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert io.geometry_mismatch(out, img) is None and out.GetOrigin() == img.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(lab))
    # Without a table values are kept too.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_label(path, img)), sitk.GetArrayFromImage(lab))


def test_read_label_float_file_with_whole_values(tmp_path):
    img = make_image()
    lab = sitk.Cast(make_label(img), sitk.sitkFloat32)
    out = io.read_label(write(lab, tmp_path / "float_label.nrrd"), img)
    assert out.GetPixelID() == sitk.sitkUInt8


def test_read_label_non_integer(tmp_path):
    img = make_image()
    arr = sitk.GetArrayFromImage(make_label(img)).astype(np.float32) * 0.5
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(img)
    with pytest.raises(InputError) as e:
        io.read_label(write(lab, tmp_path / "prob.nii.gz"), img)
    assert_input_error(e, "prob.nii.gz", "non-integer")


def test_read_label_value_not_in_table(tmp_path):
    img = make_image()
    path = write(make_label(img, (1, 2)), tmp_path / "lab.nii.gz")
    with pytest.raises(InputError) as e:
        io.read_label(path, img, [{"value": 1, "name": "Liver"}])
    assert_input_error(e, "lab.nii.gz", "2", "1 Liver")


def test_read_label_geometry_size_mismatch(tmp_path):
    img = make_image(shape_zyx=(41, 64, 64), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    img_path = write(img, tmp_path / "image.nii.gz")
    img = io.read_image(img_path)
    small = make_image(shape_zyx=(40, 64, 64), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    lab = sitk.GetImageFromArray(np.ones((40, 64, 64), np.uint8))
    lab.CopyInformation(small)
    path = write(lab, tmp_path / "label.nii.gz")
    with pytest.raises(InputError) as e:
        io.read_label(path, img)
    assert str(e.value) == "label.nii.gz: geometry does not match image.nii.gz (size 64x64x40 vs 64x64x41)"


@pytest.mark.parametrize("what", ["spacing", "origin", "direction"])
def test_read_label_geometry_mismatch(tmp_path, what):
    img = make_image()
    lab = make_label(img)
    if what == "spacing":
        lab.SetSpacing((0.8, 1.1, 2.6))
    elif what == "origin":
        lab.SetOrigin((10.0, -20.0, 31.0))
    else:
        lab.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = write(lab, tmp_path / "lab.nrrd")
    with pytest.raises(InputError) as e:
        io.read_label(path, img, image_path="scan.nii.gz")
    assert_input_error(e, "lab.nrrd", "scan.nii.gz", what)


def test_read_label_geometry_within_tolerance(tmp_path):
    img = make_image()
    lab = make_label(img)
    lab.SetSpacing(tuple(s * (1 + 2e-5) for s in img.GetSpacing()))
    lab.SetOrigin(tuple(o + 1e-4 for o in img.GetOrigin()))
    out = io.read_label(write(lab, tmp_path / "lab.nii.gz"), img)
    # Snapped to the image's exact grid.
    assert out.GetSpacing() == img.GetSpacing() and out.GetOrigin() == img.GetOrigin()


def test_read_label_empty(tmp_path):
    img = make_image()
    lab = make_label(img, ())
    path = write(lab, tmp_path / "empty.nii.gz")
    with pytest.raises(InputError) as e:
        io.read_label(path, img)
    assert_input_error(e, "empty.nii.gz", "no foreground")
    assert not sitk.GetArrayFromImage(io.read_label(path, img, allow_empty=True)).any()


def test_read_label_missing(tmp_path):
    with pytest.raises(InputError) as e:
        io.read_label(tmp_path / "gone.seg.nrrd", make_image())
    assert_input_error(e, "gone.seg.nrrd", "not found")


def test_read_label_2d_4d(tmp_path):
    img = make_image()
    p2 = write(sitk.GetImageFromArray(np.ones((14, 16), np.uint8)), tmp_path / "lab2d.nii.gz")
    with pytest.raises(InputError) as e:
        io.read_label(p2, img)
    assert_input_error(e, "lab2d.nii.gz", "2D")
    lab = make_label(img)
    p4 = write(sitk.JoinSeries([lab, lab]), tmp_path / "lab4d.nii.gz")
    with pytest.raises(InputError) as e:
        io.read_label(p4, img)
    assert_input_error(e, "lab4d.nii.gz", "4D")


# ------------------------------------------------------------------------------------------------ .seg.nrrd


def test_segmentation_roundtrip_slicerio(tmp_path):
    img = make_image()
    lab = make_label(img, (1, 2, 5))
    path = io.write_segmentation(tmp_path / "out.seg.nrrd", lab, TABLE)
    seg = slicerio.read_segmentation(path)
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == {"Liver", "Spleen", "Tumor"}
    for entry in TABLE:
        s = by_name[entry["name"]]
        assert s["labelValue"] == entry["value"]
        np.testing.assert_allclose(s["color"], entry["color"], atol=1e-6)
    assert by_name["Spleen"]["terminology"]["type"][2] == "Spleen"
    # Voxels (i, j, k) and the LPS geometry of the oblique grid survive.
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), sitk.GetArrayFromImage(lab))
    expected = np.eye(4)
    expected[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    expected[:3, 3] = img.GetOrigin()
    np.testing.assert_allclose(seg["ijkToLPS"], expected, atol=1e-9)
    # And back through our reader, and the derived label table.
    out = io.read_label(path, img, TABLE)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(lab))
    table = io.label_table_from_segmentation(path)
    assert [(e["value"], e["name"]) for e in table] == [(1, "Liver"), (2, "Spleen"), (5, "Tumor")]
    assert table[1]["terminology"] == TABLE[1]["terminology"]


def test_segmentation_names_map_by_name(tmp_path):
    img = make_image()
    lab = make_label(img, (1, 2))
    path = io.write_segmentation(tmp_path / "ann.seg.nrrd", lab, TABLE)
    # A model whose table numbers the same structures differently (and spells them in another case).
    other = [{"value": 7, "name": "SPLEEN", "color": [0, 0, 1]}, {"value": 3, "name": "liver", "color": [1, 0, 0]},
             {"value": 9, "name": "Tumor", "color": [1, 1, 0]}]
    out = sitk.GetArrayFromImage(io.read_label(path, img, other))
    ref = sitk.GetArrayFromImage(lab)
    assert set(np.unique(out)) == {0, 3, 7}
    np.testing.assert_array_equal(out == 3, ref == 1)
    np.testing.assert_array_equal(out == 7, ref == 2)


def test_segmentation_unknown_name(tmp_path):
    img = make_image()
    path = io.write_segmentation(tmp_path / "ann.seg.nrrd", make_label(img, (1, 2)), TABLE)
    with pytest.raises(InputError) as e:
        io.read_label(path, img, [{"value": 1, "name": "Liver"}, {"value": 2, "name": "Kidney"}])
    assert_input_error(e, "ann.seg.nrrd", "'Spleen'", "Liver", "Kidney")


def _layered_segmentation(img: sitk.Image, path) -> np.ndarray:
    """Write a Slicer segmentation with overlapping segments (2 layers) via slicerio; return the big mask."""
    shape_ijk = img.GetSize()
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    ijk_to_lps[:3, 3] = img.GetOrigin()
    seg = slicerio.create_segmentation(shape_ijk, ijk_to_lps)
    organ = np.zeros(shape_ijk, bool)
    organ[2:12, 2:12, 2:10] = True
    lesion = np.zeros(shape_ijk, bool)
    lesion[5:8, 5:8, 4:7] = True  # inside the organ: overlap -> second layer
    slicerio.add_segment(seg, organ, {"id": "s1", "name": "Liver", "color": [1, 0, 0]})
    slicerio.add_segment(seg, lesion, {"id": "s2", "name": "tumor", "color": [1, 1, 0]})
    assert seg["voxels"].ndim == 4
    slicerio.write_segmentation(str(path), seg)
    return organ, lesion


def test_segmentation_overlapping_layers(tmp_path):
    img = make_image()
    organ, lesion = _layered_segmentation(img, tmp_path / "layers.seg.nrrd")
    out = sitk.GetArrayFromImage(io.read_label(tmp_path / "layers.seg.nrrd", img, TABLE)).transpose(2, 1, 0)
    # Later segment wins where they overlap, as in Slicer's labelmap export.
    np.testing.assert_array_equal(out == 5, lesion)
    np.testing.assert_array_equal(out == 1, organ & ~lesion)
    # Without a table: numbered 1..N in file order.
    plain = sitk.GetArrayFromImage(io.read_label(tmp_path / "layers.seg.nrrd", img)).transpose(2, 1, 0)
    assert set(np.unique(plain)) == {0, 1, 2}
    np.testing.assert_array_equal(plain == 2, lesion)


def test_segmentation_cropped_extent_is_put_back(tmp_path):
    """Slicer can store a segmentation cropped to its segments' extent on the same voxel lattice."""
    img = make_image()
    lab_arr = sitk.GetArrayFromImage(make_label(img, (1, 2)))
    full = io.array_to_image(lab_arr, img)
    cropped = full[3:15, 1:12, 1:11]  # sitk (x, y, z) slicing keeps physical positions
    assert np.count_nonzero(sitk.GetArrayFromImage(cropped)) == np.count_nonzero(lab_arr)
    path = io.write_segmentation(tmp_path / "crop.seg.nrrd", cropped, TABLE)
    out = io.read_label(path, img, TABLE)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), lab_arr)
    # A plain label map with a different extent stays an error (could be a wrong file).
    plain = write(cropped, tmp_path / "crop_label.nii.gz")
    with pytest.raises(InputError) as e:
        io.read_label(plain, img)
    assert_input_error(e, "crop_label.nii.gz", "size")


def test_segmentation_geometry_mismatch(tmp_path):
    img = make_image()
    other = make_image(spacing=(1.0, 1.0, 1.0))
    path = io.write_segmentation(tmp_path / "wrong.seg.nrrd", make_label(other, (1,)), TABLE)
    with pytest.raises(InputError) as e:
        io.read_label(path, img, TABLE, image_path="/data/scan.nrrd")
    assert_input_error(e, "wrong.seg.nrrd", "scan.nrrd", "spacing")


def test_segmentation_all_segments_empty(tmp_path):
    img = make_image()
    path = io.write_segmentation(tmp_path / "blank.seg.nrrd", make_label(img, ()), TABLE)
    with pytest.raises(InputError) as e:
        io.read_label(path, img, TABLE)
    assert_input_error(e, "blank.seg.nrrd", "no foreground")


def test_slicer_reads_our_segmentation(tmp_path):
    """3D Slicer's own reader (MRML from the slicer-core wheel) loads names, colours, voxels and geometry."""
    slicer = pytest.importorskip("slicer")
    vtk = pytest.importorskip("vtk")
    from vtk.util import numpy_support

    img = make_image()
    lab = make_label(img, (1, 2, 5))
    path = io.write_segmentation(tmp_path / "for_slicer.seg.nrrd", lab, TABLE)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    ref = sitk.GetArrayFromImage(lab)
    for entry in TABLE:
        seg_id = segmentation.GetSegmentIdBySegmentName(entry["name"])
        segment = segmentation.GetSegment(seg_id)
        np.testing.assert_allclose(segment.GetColor(), entry["color"], atol=1e-6)
        labelmap = segment.GetRepresentation("Binary labelmap")
        ext = labelmap.GetExtent()
        dims = [ext[1] - ext[0] + 1, ext[3] - ext[2] + 1, ext[5] - ext[4] + 1]
        values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1])
        mask = values == segment.GetLabelValue()
        expected = ref[ext[4]:ext[5] + 1, ext[2]:ext[3] + 1, ext[0]:ext[1] + 1] == entry["value"]
        np.testing.assert_array_equal(mask, expected)
        assert np.count_nonzero(mask) == np.count_nonzero(ref == entry["value"])
        m = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(m)
        ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        ijk_to_lps = np.diag([-1, -1, 1, 1]) @ ijk_to_ras
        np.testing.assert_allclose(ijk_to_lps[:3, 3], img.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(ijk_to_lps[:3, :3],
                                   np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing()),
                                   atol=1e-5)


# ------------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_write_label_map_roundtrip(tmp_path, ext):
    img = make_image()
    lab = sitk.Cast(make_label(img, (1, 2, 5)), sitk.sitkInt32)
    path = io.write_segmentation(tmp_path / "sub" / f"pred{ext}", lab, TABLE)
    out = io.read_label(path, img, TABLE)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(lab))
    assert os.listdir(tmp_path / "sub") == [f"pred{ext}"]


def test_write_image_roundtrip(tmp_path):
    img = make_image()
    path = io.write_image(tmp_path / "img.nii.gz", img)
    out = io.read_image(path)
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img))
    assert io.geometry_mismatch(out, img) is None


def test_write_unsupported_extension(tmp_path):
    with pytest.raises(InputError) as e:
        io.write_image(tmp_path / "img.png", make_image())
    assert_input_error(e, "img.png", ".nii.gz")


def test_write_label_value_not_in_table(tmp_path):
    img = make_image()
    with pytest.raises(ValueError):
        io.write_segmentation(tmp_path / "x.seg.nrrd", make_label(img, (1, 2, 5)), TABLE[:2])
    assert not list(tmp_path.iterdir())


def test_segmentation_header_cannot_be_forged_by_a_label_name(tmp_path):
    """A newline in a name used to go raw into the .seg.nrrd header: a forged field, or an unreadable file."""
    img = make_image()
    forged = [{"value": 1, "name": "Liver\nSegment0_LabelValue:=9", "color": [1, 0, 0]}]
    with pytest.raises(TCURLoRAError, match="U\\+000A"):
        io.write_segmentation(tmp_path / "x.seg.nrrd", make_label(img, (1,)), forged)
    assert not list(tmp_path.iterdir())
    # .seg.nrrd headers are ASCII (pynrrd): other names are refused in one line, not a UnicodeEncodeError
    with pytest.raises(TCURLoRAError, match="must be ASCII"):
        io.write_segmentation(tmp_path / "x.seg.nrrd", make_label(img, (1,)), [{"value": 1, "name": "Läsion"}])
    assert not list(tmp_path.iterdir())
    table = [{"value": 1, "name": "Liver: left lobe | segment 2 ~ (a=b)", "color": [1, 0, 0]}]
    path = io.write_segmentation(tmp_path / "ok.seg.nrrd", make_label(img, (1,)), table)
    assert [s["name"] for s in slicerio.read_segmentation(path)["segments"]] == [table[0]["name"]]


def test_label_value_beyond_the_output_type_is_refused_not_wrapped(tmp_path):
    img = make_image()
    big = sitk.GetImageFromArray(np.where(sitk.GetArrayFromImage(make_label(img, (1,))) > 0, 2 ** 40, 0).astype(np.uint64))
    big.CopyInformation(img)
    for name in ("x.nii.gz", "x.seg.nrrd"):
        with pytest.raises((ValueError, TCURLoRAError), match="above 65535"):
            io.write_segmentation(tmp_path / name, big)
    assert not list(tmp_path.iterdir())


def test_writes_are_atomic(tmp_path, monkeypatch):
    img = make_image()
    target = tmp_path / "result.seg.nrrd"
    target.write_bytes(b"previous result")

    def failing_writer(file, segmentation, **kwargs):
        with open(file, "wb") as f:
            f.write(b"NRRD0004\npartial")
        raise OSError("disk full")

    monkeypatch.setattr(slicerio, "write_segmentation", failing_writer)
    with pytest.raises(OSError):
        io.write_segmentation(target, make_label(img), TABLE)
    assert target.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["result.seg.nrrd"]

    def failing_sitk(image, file, *args):
        open(file, "wb").write(b"partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(sitk, "WriteImage", failing_sitk)
    with pytest.raises(RuntimeError):
        io.write_image(tmp_path / "new.nii.gz", img)
    assert sorted(os.listdir(tmp_path)) == ["result.seg.nrrd"]


# ------------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("table, fragment", [
    ([{"value": 0, "name": "bg"}], "positive"),
    ([{"value": 1, "name": "a"}, {"value": 1, "name": "b"}], "twice"),
    ([{"value": 1, "name": "a"}, {"value": 2, "name": "A"}], "twice"),
    ([{"value": 1, "name": "a", "color": [2, 0, 0]}], "colour"),
    ([{"value": 1, "name": "a", "colour": [1, 0, 0]}], "unknown keys"),
    ([{"value": 1, "name": "a", "terminology": "not a terminology"}], "TerminologyEntry"),
    ([{"value": 1.5, "name": "a"}], "positive integer"),
    ([{"value": 2 ** 40, "name": "a"}], "above 65535"),
    ([{"value": float("inf"), "name": "a"}], "integer 'value'"),
    ([{"value": 1, "name": "a\nSegment0_Name:=forged"}], "control character U.000A"),
    ([{"value": 1, "name": "red\x1b[31m"}], "control character U.001B"),
    ([{"value": 1, "name": "a\u202egpj.exe"}], "control character U.202E"),
    ([{"value": 1, "name": "x" * 300}], "longer than"),
])
def test_validate_label_table_errors(table, fragment):
    with pytest.raises(TCURLoRAError, match=fragment):
        io.validate_label_table(table)


def test_validate_label_table_defaults():
    out = io.validate_label_table([{"value": 3, "name": " c "}, {"value": 1, "name": "a"}])
    assert [e["value"] for e in out] == [1, 3] and out[1]["name"] == "c"
    assert all(len(e["color"]) == 3 for e in out)


# ------------------------------------------------------------------------------------------------ cases


def test_find_cases_nnunet(tmp_path):
    img = make_image(shape_zyx=(4, 5, 6))
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("case_001", "case_002"):
        write(img, tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
    write(make_label(img, ()), tmp_path / "labelsTr" / "case_001.nii.gz")
    io.write_segmentation(tmp_path / "labelsTr" / "case_002.seg.nrrd", make_label(img, ()))
    cases = io.find_cases(tmp_path)
    assert [(os.path.basename(i), os.path.basename(l)) for i, l in cases] == [
        ("case_001_0000.nii.gz", "case_001.nii.gz"), ("case_002_0000.nii.gz", "case_002.seg.nrrd")]
    write(img, tmp_path / "imagesTr" / "case_003_0000.nii.gz")
    with pytest.raises(InputError) as e:
        io.find_cases(tmp_path)
    assert_input_error(e, "labelsTr", "case_003_0000.nii.gz")


def test_find_cases_side_by_side(tmp_path):
    img = make_image(shape_zyx=(4, 5, 6))
    write(img, tmp_path / "a.nii.gz")
    write(img, tmp_path / "a_label.nii.gz")
    write(img, tmp_path / "b.nrrd")
    io.write_segmentation(tmp_path / "b.seg.nrrd", make_label(img, ()))
    write(img, tmp_path / "c.mha")
    write(img, tmp_path / "c-label.nrrd")  # Slicer's default labelmap name
    write(img, tmp_path / "d.nii.gz")
    write(img, tmp_path / "d_seg.nii.gz")
    write(img, tmp_path / "lonely.nii.gz")  # no label: ignored
    write_dicom_series(sitk.Cast(img, sitk.sitkInt16), tmp_path / "e", "1.2.826.0.1.3680043.2.1125.3.1")
    write(img, tmp_path / "e_label.nii.gz")
    (tmp_path / "notes.txt").write_text("ignored")
    cases = [(os.path.basename(i), os.path.basename(l)) for i, l in io.find_cases(tmp_path)]
    assert cases == [("a.nii.gz", "a_label.nii.gz"), ("b.nrrd", "b.seg.nrrd"), ("c.mha", "c-label.nrrd"),
                     ("d.nii.gz", "d_seg.nii.gz"), ("e", "e_label.nii.gz")]


def test_find_cases_errors(tmp_path):
    with pytest.raises(InputError) as e:
        io.find_cases(tmp_path / "missing")
    assert_input_error(e, "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as e:
        io.find_cases(tmp_path / "empty")
    assert_input_error(e, "empty", "no (image, label) cases")
    img = make_image(shape_zyx=(4, 5, 6))
    write(img, tmp_path / "x.nii.gz")
    write(img, tmp_path / "x_label.nii.gz")
    io.write_segmentation(tmp_path / "x.seg.nrrd", make_label(img, ()))
    with pytest.raises(InputError) as e:
        io.find_cases(tmp_path)
    assert_input_error(e, "x.nii.gz", "several label files")
