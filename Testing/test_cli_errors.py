"""User errors of the CLI and the worker: one line naming the file, exit status 2, no traceback, and for
training nothing written and no training step taken. Plus `--help` of every subcommand.

Training cases are given as a good CT case FIRST and the bad file second: every case is checked before any
training starts. The base is the tiny random-init network spec of ``conftest.tiny_unet`` (plumbing only).
Numbers (1), (7) refer to the points of the issue these tests prove.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import (CT, CT_SUBREG, CT_VERT, MRI_VERT, SUBPROCESS_ENV, VERTEBRAE, cli_subprocess, read_events,
                      write_seg_nrrd_by_name)
from tcurlora import cli

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.SUBPROCESS_ENV

SUBCOMMANDS = ["finetune", "segment", "export", "evaluate", "inspect", "models", "fetch-model", "demo"]


def run(argv) -> int:
    return cli.main([os.fspath(a) for a in argv])


def like(reference: sitk.Image, array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference)
    return out


# Each maker writes one bad file into a folder and returns (role, path, words the message must contain).

def unknown_segment_name(folder: Path):
    label = sitk.ReadImage(str(CT_VERT))
    path = write_seg_nrrd_by_name(label, folder / "renamed.seg.nrrd", {21: "L2", 22: "L3", 23: "Sacrum"})
    return "label", path, ["segment 'Sacrum' is not in the label table", "L2, L3, L4"]


def unknown_label_values(folder: Path):
    return "label", CT_SUBREG, ["label values 41", "not in the label table"]  # real subregion labels


def empty_label(folder: Path):
    path = folder / "empty_msk.nii.gz"
    sitk.WriteImage(like(sitk.ReadImage(str(CT_VERT)), np.zeros((73, 47, 73), np.uint8)), str(path))
    return "label", path, ["no foreground"]


def label_of_another_image(folder: Path):
    """The real MRI's vertebra mask (C5-C7 relabelled 21-23, so only the grid is wrong) given for the CT."""
    mri = sitk.ReadImage(str(MRI_VERT))
    arr = sitk.GetArrayFromImage(mri)
    relabelled = np.select([arr == 5, arr == 6, arr == 7], [21, 22, 23], 0).astype(np.uint8)
    path = folder / "mri_grid_msk.nii.gz"
    sitk.WriteImage(like(mri, relabelled), str(path))
    return "label", path, ["geometry does not match", "sub-ct_label-22_ct.nii.gz", "size 68x52x67 vs 73x47x73"]


def label_shifted_origin(folder: Path):
    label = sitk.ReadImage(str(CT_VERT))
    label.SetOrigin(tuple(o + 0.37 for o in label.GetOrigin()))
    path = folder / "shifted_msk.nrrd"
    sitk.WriteImage(label, str(path))
    return "label", path, ["geometry does not match", "origin"]


def image_2d(folder: Path):
    path = folder / "slice_2d.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(CT))[:, :, 30], str(path))
    return "image", path, ["2D"]


def image_4d(folder: Path):
    ct = sitk.ReadImage(str(CT))
    path = folder / "timeseries_4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([ct, ct]), str(path))
    return "image", path, ["4D"]


def label_4d(folder: Path):
    lab = sitk.ReadImage(str(CT_VERT))
    path = folder / "label_4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([lab, lab]), str(path))
    return "label", path, ["4D"]


def image_with_nan(folder: Path, ext: str = ".nrrd"):
    ct = sitk.Cast(sitk.ReadImage(str(CT)), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(ct)
    arr[10, 20, 30] = np.nan
    path = folder / f"nan_ct{ext}"
    sitk.WriteImage(like(ct, arr), str(path))
    return "image", path, ["1 NaN"]


def nifti_image_with_nan(folder: Path):
    return image_with_nan(folder, ".nii.gz")


def missing_image(folder: Path):
    return "image", folder / "not_there.nii.gz", ["file not found"]


BAD_FILES = [unknown_segment_name, unknown_label_values, empty_label, label_of_another_image,
             label_shifted_origin, image_2d, image_4d, label_4d, image_with_nan, missing_image,
             nifti_image_with_nan]  # ITK reads NIfTI NaN as 0: io.read_image asks nibabel


def bad_case_args(maker, folder: Path):
    """--image/--label for a good case followed by a case with one bad file."""
    role, path, words = maker(folder)
    image, label = (path, CT_VERT) if role == "image" else (CT, path)
    return ["--image", CT, "--label", CT_VERT, "--image", image, "--label", label], Path(path), words


def assert_one_error_line(stderr: str, path: Path, words) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith(f"error: {path.name}: "), line
    assert "Traceback" not in stderr
    for word in words:
        assert word in line, (word, line)
    return line


def assert_nothing_trained(out_dir: Path, events_file: Path = None) -> None:
    assert not list(out_dir.glob("*.safetensors")) and not list(out_dir.glob("*.checkpoint.pt"))
    assert not list(out_dir.glob("*.png"))
    if events_file is not None:
        events = read_events(events_file)
        assert not [e for e in events if e["event"] in ("progress", "result")]
        assert events[-1]["event"] == "error"


# ----------------------------------------------------------------------------------------------------------
# (1) bad training files


@pytest.mark.parametrize("maker", BAD_FILES, ids=lambda f: getattr(f, "__name__", None))
def test_bad_training_file_is_one_line_before_training(maker, tiny_unet, tmp_path, capsys):
    """(1) Unknown segment name / label value, empty label, label on another grid, 2D or 4D file, NaN voxels,
    missing file: exit 2, stderr is exactly `error: <file name>: ...`, the events file ends with that error,
    no progress, and no adapter, checkpoint or curve is written."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cases, path, words = bad_case_args(maker, tmp_path)
    events = out_dir / "events.jsonl"
    capsys.readouterr()
    rc = run(["finetune", *tiny_unet.args, *cases, "--out", out_dir / "a.safetensors", "--steps", "1",
              "--batch-size", "1", "--events", events])
    captured = capsys.readouterr()
    assert rc == 2
    line = assert_one_error_line(captured.err, path, words)
    assert captured.out == ""
    assert_nothing_trained(out_dir, events)
    assert "error: " + read_events(events)[-1]["message"] == line


def test_bad_validation_file_is_caught_before_training(tiny_unet, tmp_path, capsys):
    """(1) Validation cases are checked before training too."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _, path, words = image_with_nan(tmp_path)
    rc = run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--val-image", path,
              "--val-label", CT_VERT, "--out", out_dir / "a.safetensors", "--steps", "2"])
    assert rc == 2
    assert_one_error_line(capsys.readouterr().err, path, words)
    assert_nothing_trained(out_dir)


def test_bad_file_in_a_real_process(tiny_unet, tmp_path):
    """(1) The same in a real `tcurlora finetune` process: exit 2 and one stderr line, nothing else."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cases, path, words = bad_case_args(label_of_another_image, tmp_path)
    proc = subprocess.run(cli_subprocess("finetune", *tiny_unet.args, *cases, "--out", out_dir / "a.safetensors"),
                          capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, path, words)
    assert proc.stdout == ""
    assert_nothing_trained(out_dir)


def test_bad_file_in_a_case_folder_and_a_job(tiny_unet, tmp_path, capsys):
    """(1) The same rule for --cases FOLDER and --job JOB.json."""
    folder = tmp_path / "cases"
    folder.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(folder / "ct.nii.gz"))
    sitk.WriteImage(like(sitk.ReadImage(str(CT_VERT)), np.zeros((73, 47, 73), np.uint8)),
                    str(folder / "ct_label.nii.gz"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert run(["finetune", *tiny_unet.args, "--cases", folder, "--out", out_dir / "a.safetensors"]) == 2
    assert_one_error_line(capsys.readouterr().err, folder / "ct_label.nii.gz", ["no foreground"])

    _, mri_grid, words = label_of_another_image(tmp_path)
    job = {"command": "finetune", "base": str(tiny_unet.spec), "weights": str(tiny_unet.weights),
           "device": "cpu", "steps": 2, "labels": VERTEBRAE, "out": str(out_dir / "b.safetensors"),
           "cases": [{"image": str(CT), "label": str(CT_VERT)}, {"image": str(CT), "label": str(mri_grid)}]}
    (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
    assert run(["finetune", "--job", tmp_path / "job.json"]) == 2
    assert_one_error_line(capsys.readouterr().err, mri_grid, words)
    assert_nothing_trained(out_dir)


# ----------------------------------------------------------------------------------------------------------
# other user errors: still one line, exit 2


def test_other_finetune_errors(tiny_unet, tmp_path, capsys):
    """Unpaired --image/--label, no --out, --resume with no checkpoint, a wrong --out suffix, a job file
    that is not JSON, an unwritable events file, a base spec that does not exist: one line each, exit 2."""
    out = tmp_path / "a.safetensors"
    good = ["--image", CT, "--label", CT_VERT]
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    cases = [
        (["finetune", *tiny_unet.args, "--image", CT, "--out", out], "1 training image(s) but 0 label(s)"),
        (["finetune", *tiny_unet.args, *good], "--out: is required"),
        (["finetune", *tiny_unet.args, *good, "--out", out, "--resume"], "a.checkpoint.pt: no checkpoint"),
        (["finetune", *tiny_unet.args, *good, "--out", tmp_path / "a.pt"], "a.pt: the adapter file must end"),
        (["finetune", "--job", tmp_path / "broken.json"], "broken.json: not a valid JSON job file"),
        (["finetune", *tiny_unet.args, *good, "--out", out, "--events", tmp_path / "no" / "ev.jsonl"],
         "ev.jsonl: cannot write the events file"),
        (["finetune", "--base", tmp_path / "nospec.json", *good, "--out", out], "nospec.json: no such base"),
        (["finetune", *tiny_unet.args, "--out", out], "no training cases given"),
    ]
    for argv, words in cases:
        capsys.readouterr()
        assert run(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.checkpoint.pt"))


def test_segment_and_evaluate_errors(tiny_unet, tmp_path, capsys):
    """segment: a missing input, an adapter of another base (fingerprint); evaluate: grids that differ."""
    from monai.networks.nets import UNet
    from safetensors.torch import save_file

    def one_line(argv, name, words):
        capsys.readouterr()
        assert run(argv) == 2, argv
        assert_one_error_line(capsys.readouterr().err, Path(name), words)

    one_line(["segment", *tiny_unet.args, tmp_path / "missing.nii.gz", "-o", tmp_path / "x.seg.nrrd"],
             "missing.nii.gz", ["file not found"])

    # an adapter trained on another base (other weights, same architecture) is refused by fingerprint
    import torch

    torch.manual_seed(1)
    other_weights = tmp_path / "other.safetensors"
    net = UNet(**json.loads(Path(tiny_unet.spec).read_text())["network"]["args"])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(other_weights))
    adapter = tmp_path / "other_base.safetensors"
    assert run(["finetune", "--base", tiny_unet.spec, "--weights", other_weights, "--device", "cpu",
                "--image", CT, "--label", CT_VERT, "--out", adapter, "--steps", "1", "--batch-size", "1"]) == 0
    one_line(["segment", *tiny_unet.args, "--adapter", adapter, CT, "-o", tmp_path / "x.seg.nrrd"],
             adapter.name, ["trained on base model"])
    assert not (tmp_path / "x.seg.nrrd").exists()

    one_line(["evaluate", MRI_VERT, CT_VERT], MRI_VERT.name, ["geometry does not match"])


# ----------------------------------------------------------------------------------------------------------
# (7) help and the worker's error path


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_each_subcommand(command, capsys):
    """(7) `tcurlora COMMAND --help` prints its usage and exits 0."""
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tcurlora {command}")
    assert "--help" in out


def test_help_of_the_program(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out
    assert cli.main([]) == 2  # no command: the help, and a usage error status


def test_console_script_help():
    """(7) The installed `tcurlora` console script (next to this Python; else `python -m tcurlora.cli`, the
    same `main`) answers --help in a real process."""
    script = shutil.which("tcurlora", path=os.path.dirname(sys.executable))
    argv = [script, "segment", "--help"] if script else cli_subprocess("segment", "--help")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tcurlora segment")


@pytest.mark.parametrize("content,words", [
    ("{not json", "not a valid JSON job file"),
    (json.dumps({"command": "train"}), 'job needs "command": "finetune", "segment" or "export"'),
    (json.dumps({"command": "finetune", "stpes": 3}), "unknown job keys: stpes"),
    (json.dumps({"command": "finetune", "version": 99}), "newer than this tcurlora"),
    (json.dumps({"command": "finetune", "cases": [{"image": "a.nii.gz", "label": "b.nii.gz"}],
                 "out": "a.safetensors", "batch_size": 1000000}), "batch_size: must be an integer from 1 to 64"),
    ('{"command": "finetune", "cases": [{"image": "a", "label": "b"}], "out": "a.safetensors", "lr": NaN}',
     "lr: must be a finite number, got nan"),
    (None, "job file not found"),
])
def test_worker_bad_job_file(tmp_path, content, words):
    """(7) A bad job file: the worker (a real process) prints exactly one `error` event and exits 2."""
    job = tmp_path / "job.json"
    if content is not None:
        job.write_text(content, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "tcurlora.worker", str(job)], capture_output=True, text=True,
                          timeout=120, env=SUBPROCESS_ENV)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(events) == 1 and events[0]["event"] == "error"
    assert events[0]["message"].startswith("job.json: ") and words in events[0]["message"]
    assert "Traceback" not in proc.stderr


def test_worker_bad_case_file_is_an_error_event(tiny_unet, tmp_path, capsys):
    """(7)/(1) A job whose case file is bad: one `error` event naming the file, exit 2 (in-process
    ``tcurlora.worker.main``, the same function `python -m tcurlora.worker` runs)."""
    from tcurlora import worker

    _, path, words = image_2d(tmp_path)
    job = {"command": "finetune", "base": str(tiny_unet.spec), "weights": str(tiny_unet.weights),
           "device": "cpu", "out": str(tmp_path / "a.safetensors"), "steps": 2,
           "cases": [{"image": str(CT), "label": str(CT_VERT)}, {"image": str(path), "label": str(CT_VERT)}]}
    (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
    capsys.readouterr()
    assert worker.main([str(tmp_path / "job.json")]) == 2
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["error"]
    assert events[0]["message"].startswith(f"{path.name}: ") and "2D" in events[0]["message"]
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "a.checkpoint.pt").exists()


# ----------------------------------------------------------------------------------------------------------
# settings: one validation layer for flags and job keys (types, ranges, finiteness), before any work


BAD_FLAGS = [
    (["--steps", "0"], "--steps: must be an integer from 1"),
    (["--steps", "-3"], "--steps: must be an integer from 1"),
    (["--grad-accum", "0"], "--grad-accum: must be an integer from 1"),
    (["--rank", "0"], "--rank: must be an integer from 1"),
    (["--batch-size", "0"], "--batch-size: must be an integer from 1 to 64"),
    (["--batch-size", "1000000"], "--batch-size: must be an integer from 1 to 64"),
    (["--val-every", "0"], "--val-every: must be an integer from 1"),
    (["--lr", "nan"], "--lr: must be a finite number, got nan"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--lr", "-0.1"], "--lr: must be > 0"),
    (["--patience", "-1"], "--patience: must be an integer from 0"),
    (["--seed", "-1"], "--seed: must be an integer from 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every: must be an integer from 1"),
    (["--steps", "ten"], "--steps: invalid int value: 'ten'"),
    (["--method", "adalora"], "--method: invalid choice: 'adalora'"),
]


@pytest.mark.parametrize("extra,words", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_setting_flag_is_one_line_before_any_work(extra, words, tiny_unet, tmp_path, capsys):
    """--steps 0/-3 and --grad-accum 0 trained nothing and exited 0; --rank 0, --batch-size 0, --val-every 0 gave
    tracebacks; --lr nan wrote NaN cores. Now: exit 2, one line naming the flag, nothing read or written (the
    image given does not even exist: settings are checked first)."""
    out_dir = tmp_path / "out"
    capsys.readouterr()
    try:
        rc = run(["finetune", *tiny_unet.args, "--image", tmp_path / "missing.nii.gz", "--label", CT_VERT,
                  "--out", out_dir / "a.safetensors", *extra])
    except SystemExit as exc:  # argparse's own type/choice errors (same one-line format and status)
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not out_dir.exists()


def test_patch_size_the_base_cannot_take(tiny_unet, tmp_path, capsys):
    """--patch-size 7 7 7 (the tiny base down-samples twice: it needs multiples of 8) was a traceback."""
    out = tmp_path / "a.safetensors"
    rc = run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", out, "--patch-size", "7", "7",
              "7"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: patch_size: each side must be a multiple of 8 (what this base's down-sampling needs), "
                   "got 7x7x7"]
    assert_nothing_trained(tmp_path)


JOB_BASE = {"command": "finetune", "device": "cpu", "cases": [{"image": str(CT), "label": str(CT_VERT)}]}
BAD_JOB_VALUES = [("steps", 0), ("steps", -3), ("steps", "100"), ("steps", 1.5), ("steps", True), ("grad_accum", 0),
                  ("rank", 0), ("rank", 10 ** 6), ("batch_size", 0), ("batch_size", 1000000), ("val_every", 0),
                  ("patience", -2), ("lr", "NaN"), ("lr", 0), ("weight_decay", "Infinity"), ("patch_size", [7, 7]),
                  ("patch_size", "64"), ("seed", -1), ("method", "adalora"), ("preset", 1), ("device", "tpu"),
                  ("checkpointing", "no"), ("bf16", 0), ("resume", 1), ("train_modules", "decoder"),
                  ("cases", []), ("validation", {"image": "a"}), ("labels", 5), ("out", "a.pt"), ("base", ["x"]),
                  ("checkpoint_every", -5), ("stop_file", 3)]


def test_bad_job_values_are_one_error_event_each(tiny_unet, tmp_path, capsys):
    """32 wrong-type or out-of-range job values (25 of them were "internal error" tracebacks, batch_size
    1000000 hung): each one `error` event `job.json: <key>: ...`, exit 2, within a second, nothing written.
    ``NaN``/``Infinity`` are what Python's JSON writer emits for non-finite floats."""
    from tcurlora import worker

    job_file = tmp_path / "job.json"
    for key, value in BAD_JOB_VALUES:
        job = dict(JOB_BASE, base=str(tiny_unet.spec), weights=str(tiny_unet.weights),
                   out=str(tmp_path / "a.safetensors"))
        job[key] = float(value) if value in ("NaN", "Infinity") else value
        job_file.write_text(json.dumps(job), encoding="utf-8")
        capsys.readouterr()
        t0 = time.monotonic()
        assert worker.main([str(job_file)]) == 2, (key, value)
        assert time.monotonic() - t0 < 5
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [e["event"] for e in events] == ["error"], (key, value, events)
        assert events[0]["message"].startswith(f"job.json: {key}: "), events[0]["message"]
        assert "internal error" not in events[0]["message"]
    assert sorted(os.listdir(tmp_path)) == ["job.json"]


def test_unwritable_out_is_found_before_training(tiny_unet, tmp_path, capsys):
    """An --out whose folder cannot be made (a file is in the way) was a traceback (exit 1) after training;
    now one line naming the adapter, exit 2, before a single case is read or a step taken."""
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    ev = tmp_path / "ev.jsonl"
    rc = run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", blocker / "a.safetensors",
              "--steps", "2", "--batch-size", "1", "--events", ev])
    assert rc == 2
    assert_one_error_line(capsys.readouterr().err, Path("a.safetensors"), ["cannot create the adapter folder"])
    events = read_events(ev)
    assert [e["event"] for e in events] == ["error"]


def test_full_disk_is_found_before_training(tiny_unet, tmp_path, capsys, monkeypatch):
    """A disk without room for the checkpoint and adapter (the file system reports 1 KB free; a real full disk
    is not something a test can make portably): one line, exit 2, no training step."""
    from tcurlora import atomic

    class AlmostFull:
        free = 1024

    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: AlmostFull)
    ev = tmp_path / "ev.jsonl"
    rc = run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", tmp_path / "a.safetensors",
              "--steps", "2", "--batch-size", "1", "--events", ev])
    assert rc == 2
    assert_one_error_line(capsys.readouterr().err, Path("a.checkpoint.pt"), ["not enough free space"])
    assert not [e for e in read_events(ev) if e["event"] in ("progress", "result")]
    assert_nothing_trained(tmp_path)


def test_segment_checks_its_output_before_inference(tiny_unet, tmp_path, capsys, monkeypatch):
    """segment: an output folder that cannot be made is refused before the base runs a single window."""
    import tcurlora.infer as infer

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran")

    monkeypatch.setattr(infer, "_predict", no_inference)
    blocker = tmp_path / "results"
    blocker.write_text("x", encoding="utf-8")
    assert run(["segment", *tiny_unet.args, CT, "-o", blocker / "ct.seg.nrrd"]) == 2
    assert_one_error_line(capsys.readouterr().err, Path("ct.seg.nrrd"), ["cannot create the segmentation folder"])
