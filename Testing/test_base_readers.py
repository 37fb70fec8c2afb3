"""Crafted base models and user files, as a new user or an attacker would make them: every reader answers one
line naming the file (exit 2 on the command line), never a traceback, a hang, a huge allocation or a network
request. One test per kind of crafted input: nnU-Net plans and checkpoints, deeply nested JSON, declared sizes,
Auto3DSeg zips and tables, FIFOs and names, job files, and bases that would download weights.

The bases are the suite's real ones: nnU-Net's own trained folder (``conftest.nnunet_model``), an Auto3DSeg
model made with MONAI (``auto3dseg_model``), a bundle (``test_bundle_settings.write_bundle``) and the tiny
network spec (``conftest.tiny_unet``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from conftest import CT, CT_VERT, SUBPROCESS_ENV, UNET_ARGS, VERTEBRAE, cli_subprocess
from tcurlora import cli
from tcurlora.errors import TCURLoRAError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto3dseg_model import CONFIG, make_model, write_labels_csv  # noqa: E402
from test_bundle_settings import INFERER, TRANSFORMS, write_bundle  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

DEEP = 100_000  # levels of nesting: Python's parser alone fails with RecursionError at about 1,000


def deep_json() -> str:
    return "[" * DEEP + "]" * DEEP


def run_cli(capsys, *argv):
    capsys.readouterr()
    code = cli.main([os.fspath(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def one_line(capsys, *argv) -> str:
    code, err = run_cli(capsys, *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def load_error(*args, **kwargs) -> str:
    from tcurlora.models import load_base

    with pytest.raises(TCURLoRAError) as info:
        load_base(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def little_memory(monkeypatch):
    """This machine, as one with 4 GB available (what it has varies; the refusals must not)."""
    from tcurlora import limits

    monkeypatch.setattr(limits, "available_memory", lambda: 4 * 2 ** 30)


# ----------------------------------------------------------------------------------------------
# nnU-Net plans and checkpoints


def copy_nnunet(nnunet_model, tmp_path, plans_edit=None, checkpoint_edit=None, dataset_edit=None) -> Path:
    folder = tmp_path / "Dataset901_TPTBoxCT" / nnunet_model.folder.name
    (folder / "fold_0").mkdir(parents=True)
    files = {name: json.loads((nnunet_model.folder / name).read_text()) for name in ("plans.json", "dataset.json")}
    for name, edit in (("plans.json", plans_edit), ("dataset.json", dataset_edit)):
        if edit:
            edit(files[name])
        (folder / name).write_text(json.dumps(files[name]))
    source = nnunet_model.folder / "fold_0" / "checkpoint_final.pth"
    if checkpoint_edit:
        from tcurlora.models.nnunet import read_checkpoint

        checkpoint = read_checkpoint(source)
        checkpoint_edit(checkpoint)
        torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    else:
        (folder / "fold_0" / "checkpoint_final.pth").write_bytes(source.read_bytes())
    return folder


def fullres(edit):
    return lambda plans: edit(plans["configurations"]["3d_fullres"])


NNUNET_ODDITIES = {
    "mirror-axes-int": (None, lambda c: c.update(inference_allowed_mirroring_axes=2),
                        "inference_allowed_mirroring_axes must be null or distinct axes"),
    "mirror-axis-out-of-range": (None, lambda c: c.update(inference_allowed_mirroring_axes=(0, 5)),
                                 "inference_allowed_mirroring_axes"),
    "resampling-kwarg": (fullres(lambda c: c["resampling_fn_data_kwargs"].update(antialias=True)), None,
                         "unknown argument 'antialias'"),
    "transpose-out-of-range": (lambda p: p.update(transpose_forward=[0, 1, 3]), None, "permutation of 0, 1, 2"),
    "transpose-repeated": (lambda p: p.update(transpose_forward=[0, 0, 1], transpose_backward=[0, 0, 1]), None,
                           "permutation of 0, 1, 2"),
    "transpose-inconsistent": (lambda p: p.update(transpose_forward=[2, 0, 1]), None, "does not undo"),
    "zero-spacing": (fullres(lambda c: c.update(spacing=[1.5, 0, 1.5])), None, "spacing must be three finite"),
    "zero-patch": (fullres(lambda c: c.update(patch_size=[80, 0, 80])), None, "patch_size must be three sizes"),
    "no-intensity-properties": (lambda p: p.pop("foreground_intensity_properties_per_channel"), None,
                                "foreground_intensity_properties_per_channel"),
    "patch-not-divisible": (fullres(lambda c: c.update(patch_size=[80, 48, 72])), None,
                            "not a multiple of the network's down-sampling 16x8x16"),
    "huge-features": (fullres(lambda c: c["architecture"]["arch_kwargs"].update(features_per_stage=[4096] * 5)),
                      None, "parameters needs about"),
    "stages-mismatch": (fullres(lambda c: c["architecture"]["arch_kwargs"].update(n_stages=7)), None,
                        "features_per_stage must be 7 sizes"),
    "trainer-name": (None, lambda c: c.update(trainer_name="\x1b[2Jx"), "trainer_name must be a name"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(NNUNET_ODDITIES))
def test_nnunet_plans_and_checkpoint_oddities_are_one_line(case, nnunet_model, tmp_path):
    plans_edit, checkpoint_edit, words = NNUNET_ODDITIES[case]
    folder = copy_nnunet(nnunet_model, tmp_path, plans_edit, checkpoint_edit)
    message = load_error(folder)
    assert words in message, message
    assert message.startswith(("plans.json: ", "checkpoint_final.pth: ")), message


@pytest.mark.slow
@pytest.mark.parametrize("patch", [[512, 512, 512], [1024, 1024, 1024]])
def test_nnunet_patch_beyond_memory_is_refused_before_allocation(patch, nnunet_model, tmp_path, little_memory):
    folder = copy_nnunet(nnunet_model, tmp_path, fullres(lambda c: c.update(patch_size=patch)))
    message = load_error(folder)
    assert message.startswith("plans.json: one window of " + "x".join(map(str, patch)) + " voxels") \
        and "GB of memory, 4.0 GB is available" in message, message


@pytest.mark.slow
def test_nnunet_label_names_follow_the_label_rules(nnunet_model, tmp_path):
    folder = copy_nnunet(nnunet_model, tmp_path, dataset_edit=lambda d: d.update(
        labels={"background": 0, "L2\x1b]0;pwned\x07": 1, "L3": 2, "L4": 3}))
    message = load_error(folder)
    assert message.startswith("dataset.json: ") and "control character" in message


# ----------------------------------------------------------------------------------------------
# deeply nested JSON, wherever JSON comes from


def test_deep_json_job_file_and_label_table_are_one_line(tiny_unet, tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(deep_json())
    proc = subprocess.run([sys.executable, "-m", "tcurlora.worker", str(job)], capture_output=True, text=True,
                          timeout=120, env=SUBPROCESS_ENV)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 2 and len(events) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert events[0]["message"] == "job.json: nests deeper than 64 levels"
    assert one_line(capsys, "finetune", "--job", job).endswith("job.json: nests deeper than 64 levels")
    labels = tmp_path / "labels.json"
    labels.write_text(deep_json())
    line = one_line(capsys, "finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--labels", labels,
                    "--out", tmp_path / "a.safetensors", "--steps", "1")
    assert line == "error: labels.json: nests deeper than 64 levels"


def test_deep_json_in_specs_and_bundles_is_one_line(tiny_unet, tmp_path):
    spec = tmp_path / "deep.json"
    spec.write_text(deep_json())
    assert load_error(spec, weights=tiny_unet.weights) == "deep.json: nests deeper than 64 levels"
    for name in ("inference.json", "metadata.json", "tcurlora.json"):
        folder = write_bundle(tmp_path / name.split(".")[0], TRANSFORMS, INFERER)
        (folder / "configs" / name).write_text(deep_json())
        assert load_error(folder) == f"{name}: nests deeper than 64 levels"
    folder = write_bundle(tmp_path / "yaml", TRANSFORMS)
    (folder / "configs" / "inference.json").unlink()
    (folder / "configs" / "inference.yaml").write_text("a: &a [*a]\n")  # a YAML alias that contains itself
    assert load_error(folder) == "inference.yaml: nests deeper than 64 levels"


@pytest.mark.slow
def test_deep_plans_json_is_one_line(nnunet_model, tmp_path):
    folder = copy_nnunet(nnunet_model, tmp_path)
    (folder / "plans.json").write_text(deep_json())
    assert load_error(folder) == "plans.json: nests deeper than 64 levels"


def test_discover_lists_the_good_models_and_one_line_per_bad_folder(tmp_path):
    root = tmp_path / "bundles"
    good = write_bundle(root / "good", TRANSFORMS)
    deep = write_bundle(root / "deep", TRANSFORMS)
    (deep / "configs" / "metadata.json").write_text(deep_json())
    escaped = write_bundle(root / "evil\x1b[31mname", TRANSFORMS)
    meta = {"network_data_format": {"outputs": {"pred": {"channel_def": {"0": "bg", "1": "L2\x1b]0;owned\x07"}}}}}
    (escaped / "configs" / "metadata.json").write_text(json.dumps(meta))
    proc = subprocess.run(cli_subprocess("models", "--discover", "--root", f"bundle={root}"), capture_output=True,
                          text=True, timeout=120, env=SUBPROCESS_ENV)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and "\x1b" not in proc.stdout and "\x07" not in proc.stdout, proc.stdout
    by_name = {line.split()[1].rstrip(":"): line for line in lines}
    assert "L2, L3, L4" in by_name["good"] and "cannot be used" not in by_name["good"]
    assert by_name["deep"].endswith("[cannot be used: metadata.json: nests deeper than 64 levels]")
    assert "evil?[31mname" in by_name["evil?[31mname"] and "L2?]0;owned?" in by_name["evil?[31mname"]


# ----------------------------------------------------------------------------------------------
# sizes: what a grid or window will need is known before it is allocated


def test_image_spacing_that_resamples_to_terabytes_is_refused(tiny_unet, tmp_path, capsys):
    huge = tmp_path / "huge_spacing.nrrd"
    image = sitk.ReadImage(str(CT))
    image.SetSpacing((1.5e4, 1.5e4, 1.5e4))  # 10,000 times the CT's: a 2 mm model grid of 10^15 voxels
    sitk.WriteImage(image, str(huge))
    line = one_line(capsys, "segment", "--base", tiny_unet.spec_resampled, "--weights", tiny_unet.weights,
                    "--device", "cpu", huge, "-o", tmp_path / "x.seg.nrrd")
    assert line.startswith("error: huge_spacing.nrrd: the image at the model's spacing of 547500x") \
        and "voxels needs about" in line and "GB is available" in line, line
    nan = tmp_path / "nan_spacing.mha"  # MetaImage takes a NaN spacing as written
    nan.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementSpacing = nan 1 1\n"
                    b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n" + bytes(1024))
    assert one_line(capsys, "segment", *tiny_unet.args, nan, "-o", tmp_path / "y.seg.nrrd").startswith(
        "error: nan_spacing.mha: ")
    assert not (tmp_path / "x.seg.nrrd").exists() and not (tmp_path / "y.seg.nrrd").exists()


def test_declared_patches_and_windows_are_measured_before_allocation(tiny_unet, tmp_path, little_memory):
    spec = json.loads(tiny_unet.spec.read_text())
    spec["preprocessing"]["patch_size"] = [512, 512, 512]
    (tmp_path / "big.json").write_text(json.dumps(spec))
    message = load_error(tmp_path / "big.json", weights=tiny_unet.weights)
    assert message.startswith("big.json: one window of 512x512x512 voxels through UNet needs about"), message
    spec["preprocessing"]["patch_size"] = [32, 32, 32]
    spec["inference_roi"] = [10 ** 9, 1, 1]
    (tmp_path / "far.json").write_text(json.dumps(spec))
    assert "inference_roi must be three sizes from 1 to 1024" in load_error(tmp_path / "far.json",
                                                                             weights=tiny_unet.weights)
    bundle = write_bundle(tmp_path / "bundle", TRANSFORMS, {**INFERER, "roi_size": [512, 512, 512]})
    assert load_error(bundle).startswith("inference.json: one window of 512x512x512 voxels through UNet")
    bundle = write_bundle(tmp_path / "bundle2", TRANSFORMS, {**INFERER, "roi_size": [10 ** 9] * 3})
    assert "roi_size must be three sizes from 1 to 1024" in load_error(bundle)


# ----------------------------------------------------------------------------------------------
# Auto3DSeg models and zips


@pytest.fixture(scope="module")
def a3d_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("a3d") / "model", CT, CT_VERT, steps=1)


def zip_model(path: Path, model: Path, labels: bytes, method=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(model / "model.pt", "segresnet/model.pt")
        zf.writestr(zipfile.ZipInfo("segresnet/labels.csv"), labels, compress_type=method)
    return path


def good_labels(model: Path) -> bytes:
    return (model / "labels.csv").read_bytes()


def test_auto3dseg_zip_oddities_are_one_line(a3d_model, tmp_path):
    from tcurlora.models import load_base

    assert [l["name"] for l in load_base(zip_model(tmp_path / "ok.zip", a3d_model, good_labels(a3d_model))).labels] \
        == ["L2 vertebra", "L3 vertebra", "L4 vertebra"]
    bomb = zip_model(tmp_path / "bomb.zip", a3d_model, b"LabelValue,Name\n" + b"0" * (900 << 10))
    assert "refused as a decompression bomb" in load_error(bomb)
    big = zip_model(tmp_path / "big.zip", a3d_model, b"LabelValue,Name\n" + os.urandom(2 << 20).hex().encode())
    assert "it may be at most 1,048,576" in load_error(big)
    wide = zip_model(tmp_path / "wide.zip", a3d_model, b"LabelValue,Name\n1," + b"x" * (200 << 10) + b"\n",
                     zipfile.ZIP_STORED)
    assert "not a readable CSV table (field larger than field limit" in load_error(wide)
    text = zip_model(tmp_path / "latin1.zip", a3d_model, "LabelValue,Name\n1,Wirbelkörper\n".encode("latin-1"))
    assert load_error(text) == "latin1.zip:labels.csv: is not UTF-8 text (byte 25)"
    bzip = zip_model(tmp_path / "bzip.zip", a3d_model, good_labels(a3d_model), zipfile.ZIP_BZIP2)
    assert "is compressed with bzip2" in load_error(bzip)
    stored = zip_model(tmp_path / "crc.zip", a3d_model, good_labels(a3d_model), zipfile.ZIP_STORED)
    data = bytearray(stored.read_bytes())
    at = data.index(b"LabelValue")
    data[at] ^= 0x20  # one flipped bit in the stored labels.csv
    stored.write_bytes(bytes(data))
    assert "labels.csv: is damaged (Bad CRC-32" in load_error(stored)
    method = bytearray(zip_model(tmp_path / "method.zip", a3d_model, good_labels(a3d_model)).read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers say method 99
        start = 0
        while (start := method.find(signature, start)) >= 0:
            method[start + offset:start + offset + 2] = (99).to_bytes(2, "little")
            start += 4
    (tmp_path / "method.zip").write_bytes(bytes(method))
    assert "compressed with method 99" in load_error(tmp_path / "method.zip") \
        or "not a readable zip archive" in load_error(tmp_path / "method.zip")
    (tmp_path / "cut.zip").write_bytes(stored.read_bytes()[:-30])
    assert "not an Auto3DSeg model" in load_error(tmp_path / "cut.zip") \
        or "zip" in load_error(tmp_path / "cut.zip")


def test_auto3dseg_labels_csv_cannot_forge_segment_tags(a3d_model, tmp_path):
    folder = tmp_path / "forged"
    folder.mkdir()
    (folder / "model.pt").write_bytes((a3d_model / "model.pt").read_bytes())
    rows = list(csv.reader(io.StringIO(good_labels(a3d_model).decode())))
    rows[1][7] = "Second lumbar vertebra|Segment0_Name:=forged"
    with open(folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    message = load_error(folder)
    assert message.startswith("labels.csv: line 2: the code") and "which separate terminology fields" in message
    rows[1][0] = "-3"
    rows[1][7] = "Second lumbar vertebra"
    with open(folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert "LabelValue '-3' is not a label value" in load_error(folder)


def test_auto3dseg_config_values_are_checked(a3d_model, tmp_path, little_memory):
    for change, words in (({"roi_size": 96}, "roi_size 96 is not three sizes"),
                          ({"roi_size": [512, 512, 512]}, "one window of 512x512x512 voxels through SegResNetDS"),
                          ({"intensity_bounds": [1200, "x"]}, "needs intensity_bounds"),
                          ({"resample_resolution": [0, 1, 1]}, "resample_resolution must be three finite numbers"),
                          ({"network": {**CONFIG["network"], "in_channels": [1]}}, "input channels"),
                          ({"network": {**CONFIG["network"], "init_filters": 10 ** 6}}, "parameters needs about"),
                          # a million blocks: each layer is a Python object even on the meta device (19 GB)
                          ({"network": {**CONFIG["network"], "blocks_down": [1, 1, 10 ** 6]}},
                           "SegResNetDS declares more than 5,000 layers")):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        checkpoint = torch.load(a3d_model / "model.pt", weights_only=True)
        checkpoint["config"] = {**checkpoint["config"], **change}
        torch.save(checkpoint, folder / "model.pt")
        write_labels_csv(folder / "labels.csv")
        message = load_error(folder)
        assert message.startswith("model.pt: ") and words in message, message


# ----------------------------------------------------------------------------------------------
# FIFOs, names and signals


@pytest.fixture
def fifo(tmp_path):
    def make(name):
        path = tmp_path / name
        os.mkfifo(path)
        return path

    return make


@pytest.fixture
def alarm():
    """A FIFO with no writer blocks its reader for ever: fail the test after 30 s instead of hanging it."""
    def hang(signum, frame):
        raise TimeoutError("a reader blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_fifos_are_refused_unopened(tiny_unet, tmp_path, capsys, fifo, alarm):
    out = tmp_path / "x.seg.nrrd"
    line = one_line(capsys, "segment", *tiny_unet.args, fifo("image.nii.gz"), "-o", out)
    assert line == "error: image.nii.gz: is a named pipe (FIFO); the file must be a regular file"
    line = one_line(capsys, "segment", *tiny_unet.args, "--adapter", fifo("site.safetensors"), CT, "-o", out)
    assert line == "error: site.safetensors: is a named pipe (FIFO); the file must be a regular file"
    assert "adapter file must be a regular file" in one_line(capsys, "inspect", tmp_path / "site.safetensors")
    adapter = tmp_path / "a.safetensors"
    common = [*tiny_unet.args, "--out", adapter, "--steps", "1"]
    assert one_line(capsys, "finetune", *common, "--image", CT, "--label", fifo("label.nii.gz")) \
        == "error: label.nii.gz: is a named pipe (FIFO); the file must be a regular file"
    assert one_line(capsys, "finetune", *common, "--image", CT, "--label", fifo("label.seg.nrrd")) \
        == "error: label.seg.nrrd: is a named pipe (FIFO); the segmentation must be a regular file"
    assert one_line(capsys, "finetune", *common, "--image", CT, "--label", CT_VERT, "--labels", fifo("labels.json")) \
        == "error: labels.json: is a named pipe (FIFO); the label table must be a regular file"
    assert one_line(capsys, "finetune", "--job", fifo("job.json")) \
        == "error: job.json: is a named pipe (FIFO); the job file must be a regular file"
    assert one_line(capsys, "segment", "--base", fifo("spec.json"), "--weights", tiny_unet.weights, CT, "-o", out) \
        == "error: spec.json: is a named pipe (FIFO); the base model must be a regular file"
    assert one_line(capsys, "segment", "--base", tiny_unet.spec, "--weights", fifo("w.safetensors"), CT, "-o", out) \
        == "error: w.safetensors: is a named pipe (FIFO); the weights file must be a regular file"
    assert not out.exists() and not adapter.exists()


BLOCKED = """
import os, sys
from tcurlora.runtime import StopWatch
with StopWatch(None) as stop:
    print("waiting", flush=True)
    os.open(sys.argv[1], os.O_RDONLY)  # a FIFO nobody writes to: blocks, as any read of a stalled file can
"""


def _default_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and signals are POSIX")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_stop_signal_ends_a_blocked_process(sig, fifo):
    """The stop handlers ask for a clean stop at the next poll; while a read blocks, a second SIGTERM or Ctrl-C
    ends the process as it would without them (it needed kill -9).

    The child starts with both signals at their defaults, as a process started from a terminal does: a test
    run started in the background (``cmd &``) ignores SIGINT, the child inherits that, and an ignored Ctrl-C
    rightly stays ignored."""
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED, str(fifo("stalled"))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV, preexec_fn=_default_stop_signals)
    try:
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        proc.send_signal(sig)
        time.sleep(0.5)
        assert proc.poll() is None, "the first signal only asks for a stop at the next poll"
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == -sig  # as without the handlers (Python exits an uncaught Ctrl-C by SIGINT)
    finally:
        proc.kill()
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in proc.stderr.read()


def test_terminology_with_a_bar_cannot_forge_segment_tags(tiny_unet, tmp_path, capsys):
    from test_untrusted_files import rewrite_manifest

    from tcurlora import TCURLoRAConfig, inject_adapter, save_adapter
    from tcurlora.models import load_base

    base = load_base(str(tiny_unet.spec), weights=str(tiny_unet.weights))
    inject_adapter(base.network, TCURLoRAConfig(rank=2))
    good = tmp_path / "site.safetensors"
    save_adapter(base.network, good, labels=VERTEBRAE)
    forged = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure" \
             "~SCT^14293000^L2|Segment0_Name:=forged~^^~Anatomic codes - DICOM master list~^^~^^"
    crafted = rewrite_manifest(good, tmp_path / "forged.safetensors",
                               lambda m: m["labels"][0].update(terminology=forged))
    line = one_line(capsys, "segment", *tiny_unet.args, "--adapter", crafted, CT, "-o", tmp_path / "x.seg.nrrd")
    assert "forged.safetensors" in line and "holds '|'" in line, line
    assert not (tmp_path / "x.seg.nrrd").exists()


# ----------------------------------------------------------------------------------------------
# job files


def test_job_files_with_a_nul_byte_or_too_large_are_one_line(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"command": "segment", "inputs": ["ct\x00.nii.gz"], "output": "x.seg.nrrd"}))
    proc = subprocess.run([sys.executable, "-m", "tcurlora.worker", str(job)], capture_output=True, text=True,
                          timeout=120, env=SUBPROCESS_ENV)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 2 and events[-1]["message"] == "job.json: inputs: holds a NUL character", events
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(100 * 2 ** 20)  # 100 MB (sparse): refused from its size, before it is read
    t0 = time.monotonic()
    assert one_line(capsys, "finetune", "--job", big) == "error: big.json: is 100.0 MB; a job file may be at most 32.0 MB"
    assert time.monotonic() - t0 < 5


# ----------------------------------------------------------------------------------------------
# no base reaches the network


DOWNLOADERS = [
    ("DenseNet121", {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "pretrained": True}, "pretrained=True"),
    ("EfficientNetBN", {"model_name": "efficientnet-b0", "spatial_dims": 2}, "pretrained=True (its default)"),
    ("HoVerNet", {"pretrained_url": "https://example.org/resnet50.pth"}, "pretrained_url='https://example.org"),
    ("ResNetFeatures", {"model_name": "resnet10"}, "pretrained=True (its default)"),
    ("UNet", {**UNET_ARGS, "act": "https://example.org/x"}, "hold the address"),
]


class ConnectionAttempt(AssertionError):
    pass


@pytest.fixture
def no_sockets(monkeypatch):
    """Every way out of this process: each attempt is recorded (and fails) instead of reaching the network."""
    attempts = []

    def refuse(name):
        def attempt(*args, **kwargs):
            attempts.append((name, args[1:] if name.startswith("socket.socket") else args))
            raise ConnectionAttempt(f"{name} {args!r}")
        return attempt

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse(f"socket.socket.{name}"))
    for name in ("create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, refuse(f"socket.{name}"))
    return attempts


@pytest.mark.parametrize("cls, args, words", DOWNLOADERS, ids=[d[0] for d in DOWNLOADERS])
def test_spec_or_bundle_that_would_download_weights_is_refused(cls, args, words, tmp_path, no_sockets):
    spec = tmp_path / "net.json"
    spec.write_text(json.dumps({"network": {"class": cls, "args": args}, "labels": VERTEBRAE[:1]}))
    torch.save({}, tmp_path / "w.pt")
    message = load_error(spec, weights=tmp_path / "w.pt")
    assert message.startswith("net.json: ") and words in message and "supply the trained weights" in message, message
    folder = write_bundle(tmp_path / "bundle", TRANSFORMS)
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["network_def"] = {"_target_": cls, **args}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    assert words in load_error(folder)
    assert no_sockets == []


def test_a_class_that_always_downloads_is_refused(tmp_path):
    """TransChex fetches BERT from the Hugging Face hub whatever its arguments (where transformers is installed)."""
    from tcurlora.models.construct import refuse_downloads

    TransChex = type("TransChex", (torch.nn.Module,), {})
    with pytest.raises(TCURLoRAError, match="net.json: network TransChex cannot be used: it always fetches"):
        refuse_downloads(TransChex, {}, tmp_path / "net.json")


@pytest.mark.slow
def test_every_model_path_runs_without_the_network(nnunet_model, a3d_model, tiny_unet, tmp_path, no_sockets):
    """nnU-Net, Auto3DSeg (folder and zip), bundle and spec bases load, list and segment with every socket
    call refused: not one is attempted."""
    from tcurlora.infer import segment
    from tcurlora.models import load_base
    from tcurlora.models.discover import discover_models

    zipped = zip_model(tmp_path / "a3d.zip", a3d_model, good_labels(a3d_model))
    bundle = write_bundle(tmp_path / "bundles" / "b", TRANSFORMS, INFERER)
    bases = [load_base(nnunet_model.folder, fold=0), load_base(a3d_model), load_base(zipped), load_base(bundle),
             load_base(tiny_unet.spec, weights=tiny_unet.weights)]
    assert [b.kind for b in bases] == ["nnunet", "auto3dseg", "auto3dseg", "monai", "monai"]
    found = discover_models({"nnunet": [nnunet_model.work / "nnUNet_results"], "auto3dseg": [a3d_model.parent],
                             "bundle": [tmp_path / "bundles"]})
    assert sorted(e["kind"] for e in found) == ["auto3dseg", "bundle", "nnunet"]
    small = tmp_path / "small.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(CT))[:40, :40, :40], str(small))
    for i, base in enumerate(bases[::2]):  # nnU-Net's predictor, Auto3DSeg's chain, the plain pipeline
        out = tmp_path / f"out{i}.seg.nrrd"
        segment(base, [str(small)], str(out), device="cpu")
        assert out.is_file()
    assert no_sockets == []


def test_the_offline_guard_stops_a_connection_before_it_starts(tmp_path):
    from tcurlora.offline import NetworkRefused, no_network

    with no_network(tmp_path / "spec.json"):
        with pytest.raises(NetworkRefused, match="spec.json: tried to reach the network"):
            socket.getaddrinfo("example.org", 443)
        with pytest.raises(NetworkRefused):
            socket.socket().connect(("127.0.0.1", 9))
    with socket.socket() as s:  # outside the block: untouched (a refused loopback port, no guard)
        assert s.connect_ex(("127.0.0.1", 9)) != 0
