"""tcurlora.protocol: the one definition of the job protocol (methods, presets, devices, exit codes, events,
job keys with defaults, ranges and one-line checks) that the CLI, the worker, the Slicer-side job builder and
``FinetuneOptions`` share; the one atomic writer and the one label palette."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SUBPROCESS_ENV
from tcurlora import cli, jobs, protocol
from tcurlora.protocol import SettingError, validate_job

STDLIB_MODULES = ["protocol.py", "labels.py", "atomic.py", "errors.py", "jobs.py", "manifest.py", "config.py"]


def test_importable_without_torch_numpy_or_simpleitk():
    """The Slicer side imports the protocol and the job runner before torch is installed: a fresh interpreter
    that imports them loads none of the heavy packages."""
    code = ("import sys, tcurlora.protocol, tcurlora.labels, tcurlora.jobs, tcurlora.atomic, TCURLoRALib.models; "
            "heavy = sorted(m for m in ('torch', 'numpy', 'SimpleITK', 'monai') if m in sys.modules); "
            "print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(SUBPROCESS_ENV, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("name", STDLIB_MODULES)
def test_python39_grammar_and_standard_library_only(name):
    """Slicer 5.8 runs Python 3.9: the modules it imports parse with the 3.9 grammar and import nothing
    outside the standard library and tcurlora."""
    source = (REPO / "tcurlora" / name).read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = [] if node.level else [node.module.split(".")[0]]
        else:
            continue
        for root in roots:
            assert root in sys.stdlib_module_names or root == "__future__", (name, root)


def test_every_default_passes_its_own_check():
    for setting in protocol.SETTINGS:
        if setting.default is not None:
            assert setting.check(setting.default_value()) == setting.default_value(), setting.key


def test_one_definition_of_methods_devices_and_defaults():
    """The CLI's choices and defaults, the Slicer job builder's defaults and FinetuneOptions' defaults are the
    protocol's (before: the method list existed six times; default steps were 100 in the CLI, 300 in Slicer)."""
    from tcurlora.config import METHODS as CONFIG_METHODS, PRESETS as CONFIG_PRESETS
    from tcurlora.train import FinetuneOptions

    parser = cli.build_parser()
    finetune = parser._subparsers._group_actions[0].choices["finetune"]
    actions = {a.dest: a for a in finetune._actions}
    assert tuple(actions["method"].choices) == protocol.METHODS
    assert tuple(actions["preset"].choices) == protocol.PRESETS
    assert tuple(actions["device"].choices) == protocol.DEVICES
    assert CONFIG_METHODS == protocol.METHODS and CONFIG_PRESETS == protocol.PRESETS  # one spelling: "decoder" too
    job = jobs.finetune_job(base="deepbet", cases=[{"image": "a.nrrd", "label": "a.seg.nrrd"}],
                            out="a.safetensors", stop_file="STOP")
    options = FinetuneOptions()
    for key in protocol.FINETUNE_OPTION_KEYS:
        expected = protocol.default(key)
        assert job[key] == expected, key
        value = getattr(options, key)
        assert (list(value) if isinstance(value, tuple) else value) == expected, key
    assert job["steps"] == 30 and job["batch_size"] == 1  # the CPU-sized default (benchmarks/cpu_default.py)
    # the CLI's flags carry no default of their own: a job built from them gets the protocol's
    for key, action in actions.items():
        if key in protocol.SETTINGS_BY_KEY:
            assert action.default is None, key
    assert jobs.EXIT_OK == protocol.EXIT_OK and jobs.EXIT_CANCELLED == protocol.EXIT_CANCELLED == cli.EXIT_CANCELLED


GOOD_FINETUNE = {"command": "finetune", "cases": [{"image": "a.nii.gz", "label": "a_label.nii.gz"}],
                 "out": "site.safetensors"}
GOOD_SEGMENT = {"command": "segment", "inputs": ["a.nii.gz"], "output": "a.seg.nrrd"}

# (key, bad value) for 40 wrong-type or out-of-range job values; each must be refused naming its key
BAD_VALUES = [
    ("steps", 0), ("steps", -3), ("steps", "100"), ("steps", 2.5), ("steps", True), ("steps", []),
    ("steps", 10 ** 12), ("grad_accum", 0), ("grad_accum", "2"), ("rank", 0), ("rank", 1e6), ("rank", math.inf),
    ("batch_size", 0), ("batch_size", 1000000), ("batch_size", -1), ("val_every", 0), ("patience", -1),
    ("lr", math.nan), ("lr", math.inf), ("lr", 0), ("lr", -1e-3), ("lr", "fast"), ("weight_decay", -1.0),
    ("weight_decay", math.nan), ("patch_size", [7, 7]), ("patch_size", [64, 64, "64"]), ("patch_size", [0, 64, 64]),
    ("patch_size", 64), ("patch_size", [64, 64, 10 ** 6]), ("seed", -1), ("seed", "zero"), ("method", "adalora"),
    ("method", 3), ("preset", "all"), ("device", "gpu"), ("device", 0), ("checkpointing", "yes"),
    ("bf16", 1), ("resume", "true"), ("train_modules", "decoder"), ("train_modules", [1, 2]),
    ("cases", []), ("cases", [{"image": "a.nii.gz"}]), ("cases", "a.nii.gz"), ("validation", [{"image": 1, "label": 2}]),
    ("out", "site.pt"), ("out", 5), ("labels", [{"value": 0, "name": "x"}]), ("labels", [{"value": 1, "name": 2}]),
    ("labels", [{"value": 1, "name": "x", "color": [2, 0, 0]}]), ("labels", "all"), ("base", 3),
    ("base", {"spec": "s.json", "extra": 1}), ("version", "one"), ("checkpoint_every", 0),
]
BAD_SEGMENT_VALUES = [("sw_batch_size", 0), ("sw_batch_size", 10 ** 6), ("overlap", 1.0), ("overlap", -0.1),
                      ("overlap", math.nan), ("tta", "yes"), ("largest_component", 2), ("inputs", []),
                      ("inputs", "a.nii.gz"), ("output", ""), ("probabilities", 1)]


@pytest.mark.parametrize("key,value", BAD_VALUES + BAD_SEGMENT_VALUES,
                         ids=[f"{k}={v!r}"[:40] for k, v in BAD_VALUES + BAD_SEGMENT_VALUES])
def test_bad_job_value_is_one_line_naming_the_key(key, value):
    job = dict(GOOD_SEGMENT if (key, value) in BAD_SEGMENT_VALUES else GOOD_FINETUNE)
    job[key] = value
    with pytest.raises(SettingError) as exc:
        validate_job(job, where="job.json")
    message = str(exc.value)
    assert message.startswith(f"job.json: {key}: "), message
    assert "\n" not in message and len(message) < 300
    assert isinstance(exc.value, ValueError)  # the Slicer-side builders raise ValueError


def test_options_of_a_job_are_its_checked_values():
    """A job is checked once, by the protocol; its training options are then its values, as the Python API's
    FinetuneOptions (which checks what a caller passes) would hold them."""
    from tcurlora.train import FinetuneOptions

    job = validate_job(dict(GOOD_FINETUNE, rank=4, patch_size=[32, 32, 16], train_modules=["dec"], lr=0.5))
    options = FinetuneOptions.from_job(job)
    assert options == FinetuneOptions(rank=4, patch_size=(32, 32, 16), train_modules=["dec"], lr=0.5)
    assert options.patch_size == (32, 32, 16) and options.learning_rate() == 0.5
    assert FinetuneOptions.from_job(validate_job(GOOD_FINETUNE)) == FinetuneOptions()


def test_cli_style_names_the_flag():
    job = dict(GOOD_FINETUNE, batch_size=0, command="finetune")
    with pytest.raises(SettingError, match=r"^--batch-size: must be an integer from 1 to 64, got 0$"):
        validate_job(job, style="cli")


def test_valid_job_is_completed_with_defaults():
    job = validate_job(dict(GOOD_FINETUNE, steps=12.0, patch_size=(32, 32, 16), lr=1e-3))
    assert job["steps"] == 12 and isinstance(job["steps"], int)
    assert job["patch_size"] == [32, 32, 16] and job["lr"] == 1e-3
    assert job["batch_size"] == protocol.default("batch_size") and job["validation"] == []
    assert job["version"] == protocol.JOB_VERSION and job["labels"] is None
    assert validate_job(job) == job  # idempotent: the worker re-checks what the CLI checked


def test_finetune_options_share_the_checks():
    from tcurlora.train import FinetuneOptions

    for bad in ({"steps": 0}, {"grad_accum": 0}, {"lr": float("nan")}, {"rank": 0}, {"val_every": 0},
                {"batch_size": 10 ** 6}, {"method": "adalora"}):
        with pytest.raises(SettingError, match=f"^{next(iter(bad))}: "):
            FinetuneOptions(**bad)


def test_patch_size_must_suit_the_base():
    assert protocol.check_patch_size([32, 64, 16], 16) == (32, 64, 16)
    for bad in ([7, 7, 7], [24, 32, 32], [8, 16, 16]):
        with pytest.raises(SettingError, match="multiple of 16"):
            protocol.check_patch_size(bad, 16)


def test_one_label_palette():
    """One default palette for label colours: the engine's io and the Slicer side give the label table's colour."""
    from TCURLoRALib import models
    from tcurlora import io, labels

    assert io.default_color is labels.default_color and models.defaultColor(5) == labels.default_color(5)
    colours = [tuple(labels.default_color(v)) for v in range(1, len(labels.LABEL_PALETTE) + 1)]
    assert len(set(colours)) == len(colours) and labels.default_color(1) == labels.default_color(
        1 + len(labels.LABEL_PALETTE))
    assert all(0 <= c <= 1 for rgb in colours for c in rgb)


def test_one_atomic_writer():
    """Every file tcurlora writes goes through atomic.atomic_write: no other module renames a temp file into
    place or makes its own temp file for an output."""
    offenders = []
    for path in (REPO / "tcurlora").rglob("*.py"):
        if path.name == "atomic.py":
            continue
        code = path.read_text(encoding="utf-8")
        for pattern in (r"os\.replace\(", r"os\.rename\(", r"\.rename\(", r"mkstemp\(", r"\.tmp\"", r"\.part\""):
            if re.search(pattern, code):
                offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert not offenders, offenders


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    from tcurlora.atomic import atomic_write, atomic_write_text

    target = tmp_path / "a.seg.nrrd"
    atomic_write_text(target, "old")

    def fails(tmp):
        assert tmp.endswith(".seg.nrrd")  # same extension: writers pick the format from it
        Path(tmp).write_text("half", encoding="utf-8")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, fails)
    assert target.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["a.seg.nrrd"]


def test_check_writable(tmp_path, monkeypatch):
    from tcurlora import atomic
    from tcurlora.errors import InputError

    atomic.check_writable(tmp_path / "new" / "a.safetensors")  # a missing folder is made
    assert os.listdir(tmp_path / "new") == []  # the probe is gone
    blocker = tmp_path / "file.txt"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match=r"^a.safetensors: cannot create the adapter folder"):
        atomic.check_writable(blocker / "a.safetensors", what="adapter")
    with pytest.raises(InputError, match="is a folder"):
        atomic.check_writable(tmp_path)

    class Usage:
        free = 1000

    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: Usage)  # a nearly full disk
    with pytest.raises(InputError, match=r"not enough free space for the checkpoint: 0.0 MB free"):
        atomic.check_writable(tmp_path / "a.checkpoint.pt", need_bytes=10 ** 6, what="checkpoint")


def test_job_written_by_jobs_is_read_by_the_worker(tmp_path):
    """A job dictionary from the Slicer-side builder round-trips through a job file into the worker's reader."""
    from tcurlora.worker import read_job

    job = jobs.finetune_job(base={"spec": "s.json", "weights": "w.safetensors"},
                            cases=[{"image": tmp_path / "a.nrrd", "label": tmp_path / "a.seg.nrrd"}],
                            out=tmp_path / "a.safetensors", stop_file=tmp_path / "STOP", batch_size=4)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    assert read_job(path) == job and job["batch_size"] == 4
