"""The job protocol: the one definition of what the engine accepts, shared by the CLI, the worker and Slicer.

Methods, presets, devices, exit codes, event names, the default label colours and every job key (its
type, default, range and a check that gives a one-line error naming the setting). ``tcurlora.cli`` builds
its flags from :data:`SETTINGS`, ``tcurlora.worker`` and ``tcurlora.jobs`` validate job dictionaries with
:func:`validate_job`, and ``tcurlora.train.FinetuneOptions`` takes its defaults and checks from here, so a
new option is one entry in :data:`SETTINGS`.

Standard library only and Python 3.9 compatible: the Slicer side imports it before torch is installed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import TCURLoRAError, display_name

JOB_VERSION = 1
COMMANDS = ("finetune", "segment")
METHODS = ("tcurlora", "lora", "decoder", "full", "pissa", "dora", "curlora", "lorapt")
#: Which layers a job adapts: ``auto`` (``vit`` for a network with attention blocks, else ``conv``), ``vit``,
#: ``conv`` (every same-shape conv stack), ``decoder`` (the conv stacks of the base's declared decoder modules
#: only: backward never enters the frozen encoder; faster, less to adapt) or ``none``. The tuner itself knows
#: all but ``decoder``, which the job resolves per base (:func:`tcurlora.train.adapted_layers`).
PRESETS = ("auto", "vit", "conv", "decoder", "none")
TUNER_PRESETS = ("auto", "vit", "conv", "none")
#: Where a tCURLoRA core sits (``TCURLoRAConfig.basis``).
CORE_BASES = ("cur", "orthonormal")
DEVICES = ("auto", "cpu", "cuda")

#: Process exit status of ``tcurlora`` and ``python -m tcurlora.worker``.
EXIT_OK = 0
EXIT_ERROR = 2  # bad input or settings: one ``error`` line/event says why
EXIT_CANCELLED = 3  # stop file, SIGINT or SIGTERM; a cancelled training leaves a resumable checkpoint

#: Events the worker prints, one JSON object per line (``{"event": NAME, ...}``).
EVENT_LOG = "log"
EVENT_PROGRESS = "progress"
EVENT_WARNING = "warning"
EVENT_ERROR = "error"
EVENT_RESULT = "result"
EVENTS = (EVENT_LOG, EVENT_PROGRESS, EVENT_WARNING, EVENT_ERROR, EVENT_RESULT)
#: Added by ``tcurlora.jobs.WorkerJob`` (not the worker) once the process has ended.
EVENT_EXIT = "exit"

ADAPTER_SUFFIX = ".safetensors"
#: Learning rate when the job gives none: the cores learn fast, fully trained weights slowly.
DEFAULT_LR = {"tcurlora": 1e-2, "lora": 1e-3, "decoder": 1e-3, "full": 1e-4,
              "pissa": 1e-3, "dora": 1e-3, "curlora": 1e-2, "lorapt": 1e-3}
#: A new output layer (labels the base lacks) starts untrained for its new labels: it learns at this rate
#: whatever the method and its ``lr`` (at 1e-3, the rate fully trained modules get beside cores, the last
#: layer of deepbet moved its lesion channel too slowly to leave the all-background start within 100 steps).
NEW_HEAD_LR = 1e-2
#: Without ``checkpoint_every``, training saves a resumable checkpoint after the first step and then whenever
#: this many seconds have passed since the last one: a kill -9 or power loss costs at most this much work.
CHECKPOINT_INTERVAL_S = 120.0

# Distinct default colours for labels without a colour (Slicer-like soft tones), as RGB in 0..1.
LABEL_PALETTE = (
    (0.502, 0.682, 0.502), (0.945, 0.839, 0.569), (0.694, 0.478, 0.396), (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310), (0.867, 0.510, 0.396), (0.565, 0.933, 0.565), (0.753, 0.408, 0.690),
    (0.863, 0.961, 0.078), (0.306, 0.247, 0.000), (1.000, 0.980, 0.863), (0.902, 0.863, 0.275),
    (0.784, 0.784, 0.922), (0.980, 0.980, 0.824), (0.957, 0.839, 0.584), (0.000, 0.592, 0.808),
)


def default_color(value: int) -> List[float]:
    """The default colour of a label value (the same on every path: engine, CLI and Slicer)."""
    return [float(c) for c in LABEL_PALETTE[(int(value) - 1) % len(LABEL_PALETTE)]]


# ----------------------------------------------------------------------------------------------------------
# errors


class SettingError(TCURLoRAError, ValueError):
    """A setting (CLI flag, job key or option) of the wrong type or out of range; the message names it."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"{name}: {problem}")


class _Invalid(Exception):
    """Raised by a check with the problem only; :func:`validate_settings` adds the setting's name."""


# ----------------------------------------------------------------------------------------------------------
# checks: each takes a value and returns it normalised, or raises _Invalid(problem)

Check = Callable[[Any], Any]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(lo: int, hi: int) -> Check:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"must be an integer, got {_show(value)}")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise _Invalid(f"must be an integer, got {_show(value)}")
        value = int(value)
        if not lo <= value <= hi:
            raise _Invalid(f"must be an integer from {lo} to {hi}, got {value}")
        return value

    check.text = f"integer {lo}..{hi}"
    return check


def number(lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"must be a number, got {_show(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise _Invalid(f"must be a finite number, got {value}")
        if value < lo or value > hi or (lo_open and value == lo):
            raise _Invalid(f"must be {'>' if lo_open else '≥'} {lo:g} and ≤ {hi:g}, got {value:g}")
        return value

    check.text = f"number {'>' if lo_open else '≥'} {lo:g}, ≤ {hi:g}"
    return check


def boolean(value):
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_show(value)}")
    return value


boolean.text = "true/false"


def choice(options: Sequence[str]) -> Check:
    def check(value):
        if value not in options:
            raise _Invalid(f"must be one of {', '.join(options)}, got {_show(value)}")
        return value

    check.text = "|".join(options)
    check.options = tuple(options)
    return check


def text(value):
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise _Invalid(f"must be a non-empty text, got {_show(value)}")
    return os.fspath(value)


text.text = "text"


def optional(check: Check) -> Check:
    def maybe(value):
        return None if value is None else check(value)

    maybe.text = f"{check.text} or null"
    return maybe


def text_list(min_items: int = 0) -> Check:
    def check(value):
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"must be a list, got {_show(value)}")
        if len(value) < min_items:
            raise _Invalid(f"needs at least {min_items} item(s)")
        return [text(v) for v in value]

    check.text = "list of texts"
    return check


def int_triple(lo: int, hi: int) -> Check:
    one = integer(lo, hi)

    def check(value):
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise _Invalid(f"must be three integers, got {_show(value)}")
        try:
            return [one(v) for v in value]
        except _Invalid:
            raise _Invalid(f"must be three integers from {lo} to {hi}, got {_show(list(value))}") from None

    check.text = f"three integers {lo}..{hi}"
    return check


def adapter_path(value):
    value = text(value)
    if not value.endswith(ADAPTER_SUFFIX):
        raise _Invalid(f"{display_name(value)}: the adapter file must end in {ADAPTER_SUFFIX}")
    return value


adapter_path.text = f"file{ADAPTER_SUFFIX}"


def base_model(value):
    if isinstance(value, dict):
        if set(value) - {"spec", "weights"} or not value.get("spec"):
            raise _Invalid("must be a name, a folder, a spec .json, or {\"spec\": FILE, \"weights\": FILE}")
        return {k: text(v) for k, v in value.items() if v is not None}
    return text(value)


base_model.text = "name, folder or spec"


def case_list(min_items: int) -> Check:
    def check(value):
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"must be a list of {{\"image\": FILE, \"label\": FILE}}, got {_show(value)}")
        if len(value) < min_items:
            raise _Invalid("no training cases given (use --image/--label, --cases FOLDER or a job file)")
        out = []
        for i, case in enumerate(value, start=1):
            if not isinstance(case, dict) or set(case) != {"image", "label"}:
                raise _Invalid(f"case {i} must be {{\"image\": FILE, \"label\": FILE}}, got {_show(case)}")
            try:
                out.append({"image": text(case["image"]), "label": text(case["label"])})
            except _Invalid as exc:
                raise _Invalid(f"case {i}: {exc}") from None
        return out

    check.text = "list of {image, label}"
    return check


LABELS_FROM_SEGMENTATION = "from-segmentation"
#: A label of this name (any value, case-insensitive) marks voxels nobody annotated (a partly corrected case):
#: training leaves them out of the loss and of validation; it is not an output class (nnU-Net's convention).
IGNORE_LABEL = "ignore"


def label_table(value):
    """The job's label table (structure only; names, colours and terminology are checked by ``tcurlora.io``)."""
    if value is None or value == LABELS_FROM_SEGMENTATION:
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise _Invalid(f"must be a list of {{\"value\", \"name\", \"color\"}} or \"{LABELS_FROM_SEGMENTATION}\"")
    out = []
    for entry in value:
        if not isinstance(entry, dict) or "value" not in entry or "name" not in entry:
            raise _Invalid(f"each label needs a \"value\" and a \"name\", got {_show(entry)}")
        item = dict(entry)
        try:
            item["value"] = integer(1, 2 ** 31 - 1)(entry["value"])
        except _Invalid as exc:
            raise _Invalid(f"label value {exc}") from None
        if not isinstance(entry["name"], str):
            raise _Invalid(f"label name must be a text, got {_show(entry['name'])}")
        if entry.get("color") is not None:
            color = entry["color"]
            if not isinstance(color, (list, tuple)) or len(color) < 3:
                raise _Invalid(f"colour of '{entry['name']}' must be three numbers 0..1, got {_show(color)}")
            try:
                item["color"] = [number(0.0, 1.0)(c) for c in color[:3]]
            except _Invalid:
                raise _Invalid(f"colour of '{entry['name']}' must be three numbers 0..1, got {_show(color)}") from None
        out.append(item)
    return out


label_table.text = "label table"


# ----------------------------------------------------------------------------------------------------------
# the settings


@dataclass(frozen=True)
class Setting:
    """One job key. ``flag``: its CLI option (None = job files only, or built by the CLI from other flags);
    ``cli_type``/``nargs``/``metavar``: how the CLI parses it; ``commands``: where it is accepted."""

    key: str
    check: Check
    default: Any
    help: str
    commands: Tuple[str, ...] = COMMANDS
    flag: Optional[str] = None
    cli_type: Optional[Callable[[str], Any]] = None
    nargs: Any = None
    metavar: Any = None
    required: bool = False

    def default_value(self) -> Any:
        return list(self.default) if isinstance(self.default, (list, tuple)) else self.default

    def display(self, style: str) -> str:
        """The setting's name as its user wrote it: a CLI flag, or a job key."""
        return self.flag if style == "cli" and self.flag else self.key


MAX_STEPS = 10_000_000
MAX_BATCH = 64  # patches per step: more is a typo (or an out-of-memory hang), not a training plan
MAX_PATCH = 1024
MAX_RANK = 1024

_F, _S = ("finetune",), ("segment",)

SETTINGS: Tuple[Setting, ...] = (
    # every command
    Setting("version", integer(1, 10 ** 6), JOB_VERSION, "job file format version"),
    Setting("command", choice(COMMANDS), None, "finetune or segment", required=True),
    Setting("base", base_model, "deepbet", "base model: a catalog name (default: deepbet; see `tcurlora models`), "
            "a MONAI bundle folder, an nnU-Net or Auto3DSeg model folder, or a network spec .json (then also "
            "--weights)", flag="--base",
            metavar="NAME|PATH"),
    Setting("weights", optional(text), None, "weights for a network spec (.safetensors, or .pt read with "
            "weights_only)", flag="--weights", metavar="FILE"),
    Setting("fold", optional(integer(0, 999)), None, "for an nnU-Net model folder: use fold_N (needed when it "
            "has several)", flag="--fold", cli_type=int, metavar="N"),
    Setting("device", choice(DEVICES), "auto", "where to compute (auto prefers a CUDA GPU)", flag="--device"),
    Setting("stop_file", optional(text), None, "end cleanly (with a resumable checkpoint) when FILE appears",
            flag="--stop-file", metavar="FILE"),
    Setting("events", optional(text), None, "also write JSON-lines events (progress, log, warning, error, result) "
            "to FILE, or to standard output with -", flag="--events", metavar="FILE|-"),
    # finetune
    Setting("cases", case_list(1), None, "training cases", _F, required=True),
    Setting("validation", case_list(0), [], "validation cases", _F),
    Setting("labels", label_table, None, "the adapter's label table (a JSON file [{value, name, color}]), or "
            "'from-segmentation' to take it from the first .seg.nrrd; labels that differ from the base's train a "
            "new head", _F, flag="--labels", metavar="JSON|from-segmentation"),
    Setting("out", adapter_path, None, "where to write the adapter", _F, flag="--out",
            metavar="ADAPTER.safetensors", required=True),
    Setting("resume", boolean, False, "continue a stopped run from its checkpoint, to the same end", _F),
    Setting("start_from", optional(text), None, "continue training an adapter of this base (its method, stacks, "
            "indices and trained state are the starting point; it must have the same labels)", _F,
            flag="--start-from", metavar="ADAPTER.safetensors"),
    Setting("method", choice(METHODS), "tcurlora", "tcurlora (default), or a baseline: lora, pissa, dora (HF "
            "PEFT, same layers), curlora (matrix CUR per layer), lorapt (t-SVD of the same stacks), decoder, full",
            _F, flag="--method"),
    Setting("rank", integer(1, MAX_RANK), 8, "CUR rank r (default 8)", _F, flag="--rank", cli_type=int),
    Setting("preset", choice(PRESETS), "auto", "which stacks to adapt: auto (default: vit if the network has "
            "attention, else conv), vit, conv, decoder (only the base's decoder convs: faster steps, less to adapt) "
            "or none", _F, flag="--preset"),
    Setting("train_modules", text_list(), [], "modules to train fully as well (e.g. a decoder); opt-in", _F,
            flag="--train-modules", nargs="*", metavar="REGEX"),
    Setting("basis", choice(CORE_BASES), "cur", "tcurlora's core basis: cur (default: between 𝒞 and ℛ, as in the "
            "paper) or orthonormal (between orthonormal bases of the same spans; same values, exact merge)", _F,
            flag="--basis"),
    # 30 steps of one full-size patch: about 2 minutes for deepbet on 2 CPU cores, and on the demo's task within
    # 0.001 Dice of 100 steps (benchmarks/cpu_default.py); more cases, or a GPU, can take more
    Setting("steps", integer(1, MAX_STEPS), 30, "training steps (default 30; raise it for many cases or on a GPU)",
            _F, flag="--steps", cli_type=int),
    Setting("lr", optional(number(0.0, 10.0, lo_open=True)), None, "learning rate (default depends on the method: "
            + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + ")", _F, flag="--lr", cli_type=float),
    Setting("weight_decay", number(0.0, 1.0), 2e-5, "AdamW weight decay (default 2e-5)", _F,
            flag="--weight-decay", cli_type=float),
    Setting("batch_size", integer(1, MAX_BATCH), 1, f"patches per step (default 1, at most {MAX_BATCH})", _F,
            flag="--batch-size", cli_type=int),
    Setting("patch_size", optional(int_triple(1, MAX_PATCH)), None, "training patch, each side a multiple of what "
            "the base needs (default: the base's)", _F, flag="--patch-size", cli_type=int, nargs=3,
            metavar=("X", "Y", "Z")),
    Setting("val_every", integer(1, MAX_STEPS), 25, "validate every N steps (default 25)", _F, flag="--val-every",
            cli_type=int),
    Setting("patience", integer(0, 10 ** 6), 4, "early stop after N validations without gain (default 4; 0 = "
            "never)", _F, flag="--patience", cli_type=int),
    Setting("grad_accum", integer(1, 1024), 1, "gradient accumulation steps (default 1)", _F, flag="--grad-accum",
            cli_type=int),
    Setting("checkpoint_every", optional(integer(1, MAX_STEPS)), None, "save a resumable checkpoint every N steps "
            f"(default: every {CHECKPOINT_INTERVAL_S / 60:g} minutes of training)", _F, flag="--checkpoint-every",
            cli_type=int),
    Setting("checkpointing", boolean, False, "activation checkpointing (less GPU memory, slower)", _F),
    Setting("bf16", boolean, True, "bf16 autocast on CUDA", _F),
    Setting("seed", integer(0, 2 ** 32 - 1), 0, "random seed; on a CPU the same seed (and the same number of "
            "threads) gives the same adapter", _F, flag="--seed", cli_type=int),
    # segment
    Setting("inputs", text_list(1), None, "image files, DICOM folders or folders of images", _S, required=True),
    Setting("output", text, None, "output file (one input) or folder (several)", _S, required=True),
    Setting("adapter", optional(text), None, "a tCURLoRA adapter for this base", _S, flag="--adapter",
            metavar="ADAPTER.safetensors"),
    Setting("tta", boolean, False, "average over mirrored inputs (slower, smoother)", _S),
    Setting("largest_component", optional(boolean), None, "keep only the largest connected component per label "
            "(null: the base's choice for its own labels; an adapter's new labels keep every component)", _S),
    Setting("probabilities", boolean, False, "also write class probabilities (NIfTI)", _S),
    Setting("sw_batch_size", integer(1, MAX_BATCH), 1, "sliding-window batch (default 1)", _S,
            flag="--sw-batch-size", cli_type=int),
    Setting("overlap", optional(number(0.0, 0.95)), None, "sliding-window overlap 0..0.95 (default: the base "
            "model's own, 0.25 unless it says otherwise)", _S,
            flag="--overlap", cli_type=float),
)

SETTINGS_BY_KEY: Dict[str, Setting] = {s.key: s for s in SETTINGS}

#: The keys ``tcurlora.train.FinetuneOptions`` holds (the training settings proper; not files).
FINETUNE_OPTION_KEYS = ("method", "rank", "preset", "steps", "lr", "weight_decay", "batch_size", "patch_size",
                        "val_every", "patience", "seed", "device", "bf16", "checkpointing", "grad_accum",
                        "train_modules", "checkpoint_every", "basis")


def default(key: str) -> Any:
    """The default value of a job key (a fresh list for list-valued keys)."""
    return SETTINGS_BY_KEY[key].default_value()


def settings_for(command: str) -> List[Setting]:
    return [s for s in SETTINGS if command in s.commands]


def check_setting(key: str, value: Any, style: str = "job") -> Any:
    """``value`` checked and normalised for ``key``; :class:`SettingError` naming the setting otherwise."""
    setting = SETTINGS_BY_KEY[key]
    try:
        return setting.check(value)
    except _Invalid as exc:
        raise SettingError(setting.display(style), str(exc)) from None


def validate_settings(values: Mapping[str, Any], keys: Sequence[str], style: str = "job") -> Dict[str, Any]:
    """Check every key in ``keys`` (missing or None -> its default); returns the normalised values."""
    out = {}
    for key in keys:
        value = values.get(key)
        out[key] = default(key) if value is None and SETTINGS_BY_KEY[key].default is not None else \
            check_setting(key, value, style)
    return out


def validate_job(job: Any, style: str = "job", where: str = "") -> Dict[str, Any]:
    """A job dictionary checked and completed with the defaults.

    ``style``: name settings as job keys (``"job"``) or CLI flags (``"cli"``); ``where``: a prefix for the
    messages (the job file's name). Unknown keys are an error: a typo must not silently use a default.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(job, dict) or job.get("command") not in COMMANDS:
        raise TCURLoRAError(f"{prefix}job needs \"command\": \"finetune\" or \"segment\"")
    version = job.get("version", JOB_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version > JOB_VERSION:
        raise TCURLoRAError(f"{prefix}job version {version} is newer than this tcurlora; upgrade it")
    allowed = settings_for(job["command"])
    unknown = set(job) - {s.key for s in allowed}
    if unknown:
        raise TCURLoRAError(f"{prefix}unknown job keys: {', '.join(sorted(unknown))}")
    for setting in allowed:
        if setting.required and job.get(setting.key) is None:
            if setting.key == "cases":  # the message users of every entry point understand
                raise SettingError(setting.display(style), "no training cases given (use --image/--label, "
                                   "--cases FOLDER or a job file)")
            raise SettingError(setting.display(style), f"is required ({setting.metavar or setting.check.text})")
    try:
        return validate_settings(job, [s.key for s in allowed], style)
    except SettingError as exc:
        if where:
            raise SettingError(f"{where}: {exc.name}", exc.problem) from None
        raise


def check_patch_size(patch: Sequence[int], divisible_by: int, name: str = "patch_size") -> Tuple[int, int, int]:
    """A training patch the base can take: each side a positive multiple of ``divisible_by``."""
    patch = tuple(int(p) for p in patch)
    if any(p < divisible_by or p % divisible_by for p in patch):
        raise SettingError(name, f"each side must be a multiple of {divisible_by} (what this base's down-sampling "
                                 f"needs), got {'x'.join(map(str, patch))}")
    return patch
