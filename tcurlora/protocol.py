"""The job protocol: the one definition of what the engine accepts, shared by the CLI, the worker and Slicer.

Methods and their traits, presets, devices, exit codes, event names and every job key (its type, default,
range and a check that gives a one-line error naming the setting). ``tcurlora.cli`` builds its flags from
:data:`SETTINGS`, ``tcurlora.worker`` and ``tcurlora.jobs`` validate job dictionaries with :func:`validate_job`,
and ``tcurlora.train.FinetuneOptions`` takes its defaults and checks from here, so a new option is one entry in
:data:`SETTINGS`.

Standard library only and Python 3.9 compatible: the Slicer side imports it before torch is installed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import TCURLoRAError, display_name, shown
from .labels import LABELS_FROM_SEGMENTATION, LabelError, check_label_table

JOB_VERSION = 1
COMMANDS = ("finetune", "segment", "export")
#: Which layers a job (and :class:`tcurlora.config.TCURLoRAConfig`) adapts: ``auto`` (``vit`` for a network with
#: attention blocks, else ``conv``), ``vit``, ``conv`` (every same-shape conv stack), ``decoder`` (the conv stacks
#: of the base's declared decoder modules only: backward never enters the frozen encoder; faster, less to
#: adapt) or ``none``.
PRESETS = ("auto", "vit", "conv", "decoder", "none")
#: Where a tCURLoRA core sits (``TCURLoRAConfig.basis``).
CORE_BASES = ("cur", "orthonormal")
#: How a tCURLoRA stack picks its columns and rows of 𝒲 (``TCURLoRAConfig.selection``): by their energy (the
#: paper's top-r rule), drawn with inverted probabilities (CURLoRA's), or by their alignment with the task's first
#: gradient (``gradient``: chosen by ``finetune`` from its training patches; the indices are saved in the file).
CORE_SELECTIONS = ("deterministic", "sampled", "gradient")
#: Where a label the base lacks starts in a fresh adapter's new head (``FinetuneOptions.head_start``): ``auto``
#: (the method's own, :attr:`MethodTraits.head_start`), ``prototype`` (at the label's prototype in the base's
#: last-decoder features: :mod:`tcurlora.tuners.head_start`) or ``low-prior`` (a copy of the background at 1 %).
HEAD_STARTS = ("auto", "prototype", "low-prior")
#: What ``finetune`` gives a tcurlora adapter whose label table adds a label the base lacks, in each of these
#: options left at its default (``new_label_recipe``; the ablation in docs/new_structure.md measured it); and a
#: ``rank_budget`` that keeps the whole adapter within 1/NEW_LABEL_VALUE_SHARE of LoRA's values
NEW_LABEL_RECIPE = {"basis": "orthonormal", "rank_stable": True, "norm_scale_shift": True}
#: the recipe's adapter (cores, norms' scales and shifts, new head) holds at most this fraction of the values HF
#: PEFT's LoRA of the same rank trains on the same layers (its convolutions: PEFT has no transposed-conv LoRA)
NEW_LABEL_VALUE_SHARE = 10
#: The rank whose step a rank-stable core keeps (``TCURLoRAConfig.rank_stable``): the rank the rates were chosen at.
REFERENCE_RANK = 8
DEVICES = ("auto", "cpu", "cuda")
#: What ``export`` writes: the base's own format (nnU-Net results folder, MONAI bundle, SlicerMONAIAuto3DSeg model).
EXPORT_FORMATS = ("nnunet", "bundle", "auto3dseg")
#: The file in every export naming its base fingerprint, adapter sha256, label channels and how to run it.
EXPORT_TRACE_FILE = "tcurlora-export.json"

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


@dataclass(frozen=True)
class MethodTraits:
    """What the engine outside the tuner knows about one method (its strategy: :mod:`tcurlora.tuners.registry`).

    ``default_lr``: the learning rate when the job gives none (the cores learn fast, fully trained weights
    slowly); ``peft``: HF PEFT's LoRA layers (a file lists ``lora_targets`` with ``lora_A``/``lora_B`` tensors;
    training and inference run them unmerged, as PEFT's merge covers not every conv layer); ``averageable``: the weighted mean of adapters is exactly the mean of their weight
    updates (``tcurlora aggregate``, federated rounds); ``tensors``: the names of its trainable tensors, beside
    any module it trains fully; ``head_start``: where a label the base lacks starts in its new head when the job
    says ``auto`` (the start that trained it better on the new-structure benchmark, docs/new_structure.md).
    """

    name: str
    default_lr: float
    peft: bool
    averageable: bool
    tensors: Tuple[str, ...]
    head_start: str = "low-prior"


METHOD_TRAITS: Dict[str, MethodTraits] = {t.name: t for t in (
    MethodTraits("tcurlora", 1e-2, peft=False, averageable=True, tensors=("delta_u", "norm_scale", "norm_shift"),
                 head_start="prototype"),
    MethodTraits("lora", 1e-3, peft=True, averageable=False, tensors=("lora_A", "lora_B")),
    MethodTraits("decoder", 1e-3, peft=False, averageable=True, tensors=()),
    MethodTraits("full", 1e-4, peft=False, averageable=True, tensors=()),
    MethodTraits("pissa", 1e-3, peft=True, averageable=False, tensors=("lora_A", "lora_B"), head_start="prototype"),
    MethodTraits("dora", 1e-3, peft=True, averageable=False, tensors=("lora_A", "lora_B", "lora_magnitude_vector")),
    MethodTraits("curlora", 1e-2, peft=False, averageable=False, tensors=("delta_u",), head_start="prototype"),
    MethodTraits("lorapt", 1e-3, peft=False, averageable=False, tensors=("principal_left", "principal_right")),
)}
METHODS = tuple(METHOD_TRAITS)
#: The learning rate of each method when the job gives none.
DEFAULT_LR = {name: traits.default_lr for name, traits in METHOD_TRAITS.items()}
PEFT_METHODS = tuple(name for name, traits in METHOD_TRAITS.items() if traits.peft)
AVERAGEABLE_METHODS = tuple(name for name, traits in METHOD_TRAITS.items() if traits.averageable)

ADAPTER_SUFFIX = ".safetensors"
#: A new output layer (labels the base lacks) starts untrained for its new labels: it learns at this rate
#: whatever the method and its ``lr`` (at 1e-3, the rate fully trained modules get beside cores, the last
#: layer of deepbet moved its lesion channel too slowly to leave the all-background start within 100 steps).
NEW_HEAD_LR = 1e-2
#: Without ``checkpoint_every``, training saves a resumable checkpoint after the first step and then whenever
#: this many seconds have passed since the last one: a kill -9 or power loss costs at most this much work.
CHECKPOINT_INTERVAL_S = 120.0

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


def integer(lo: int, hi: int) -> Check:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"must be an integer, got {shown(value)}")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise _Invalid(f"must be an integer, got {shown(value)}")
        value = int(value)
        if not lo <= value <= hi:
            raise _Invalid(f"must be an integer from {lo} to {hi}, got {value}")
        return value

    check.text = f"integer {lo}..{hi}"
    check.bounds = (lo, hi)
    return check


def number(lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"must be a number, got {shown(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise _Invalid(f"must be a finite number, got {value}")
        if value < lo or value > hi or (lo_open and value == lo):
            raise _Invalid(f"must be {'>' if lo_open else '≥'} {lo:g} and ≤ {hi:g}, got {value:g}")
        return value

    check.text = f"number {'>' if lo_open else '≥'} {lo:g}, ≤ {hi:g}"
    check.bounds = (lo, hi)
    return check


def boolean(value):
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {shown(value)}")
    return value


boolean.text = "true/false"


def choice(options: Sequence[str]) -> Check:
    def check(value):
        if value not in options:
            raise _Invalid(f"must be one of {', '.join(options)}, got {shown(value)}")
        return value

    check.text = "|".join(options)
    check.options = tuple(options)
    return check


def text(value):
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise _Invalid(f"must be a non-empty text, got {shown(value)}")
    if "\0" in os.fspath(value):  # no file name holds one: the OS refuses it with a ValueError
        raise _Invalid("holds a NUL character")
    return os.fspath(value)


text.text = "text"


def optional(check: Check) -> Check:
    def maybe(value):
        return None if value is None else check(value)

    maybe.text = f"{check.text} or null"
    if hasattr(check, "bounds"):
        maybe.bounds = check.bounds
    return maybe


def text_list(min_items: int = 0) -> Check:
    def check(value):
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"must be a list, got {shown(value)}")
        if len(value) < min_items:
            raise _Invalid(f"needs at least {min_items} item(s)")
        return [text(v) for v in value]

    check.text = "list of texts"
    return check


def int_triple(lo: int, hi: int) -> Check:
    one = integer(lo, hi)

    def check(value):
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise _Invalid(f"must be three integers, got {shown(value)}")
        try:
            return [one(v) for v in value]
        except _Invalid:
            raise _Invalid(f"must be three integers from {lo} to {hi}, got {shown(list(value))}") from None

    check.text = f"three integers {lo}..{hi}"
    check.bounds = (lo, hi)  # of each side
    return check


def check_adapter_path(path, what: str = "adapter file") -> str:
    """The name of an adapter file without its suffix (``site.v2.safetensors`` -> ``site.v2``); a
    :class:`TCURLoRAError` naming the file unless the name ends in :data:`ADAPTER_SUFFIX`."""
    name = os.path.basename(os.fspath(path))
    if not name.endswith(ADAPTER_SUFFIX) or name == ADAPTER_SUFFIX:
        raise TCURLoRAError(f"{display_name(path)}: the {what} must end in {ADAPTER_SUFFIX}")
    return name[: -len(ADAPTER_SUFFIX)]


def adapter_path(value):
    value = text(value)
    try:
        check_adapter_path(value)
    except TCURLoRAError as exc:
        raise _Invalid(str(exc)) from None
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
            raise _Invalid(f"must be a list of {{\"image\": FILE, \"label\": FILE}}, got {shown(value)}")
        if len(value) < min_items:
            raise _Invalid("no training cases given (use --image/--label, --cases FOLDER or a job file)")
        out = []
        for i, case in enumerate(value, start=1):
            if not isinstance(case, dict) or set(case) != {"image", "label"}:
                raise _Invalid(f"case {i} must be {{\"image\": FILE, \"label\": FILE}}, got {shown(case)}")
            try:
                out.append({"image": text(case["image"]), "label": text(case["label"])})
            except _Invalid as exc:
                raise _Invalid(f"case {i}: {exc}") from None
        return out

    check.text = "list of {image, label}"
    return check


def label_table(value):
    """The job's label table, checked by :func:`tcurlora.labels.check_label_table`; ``from-segmentation``; or None."""
    if value is None or value == LABELS_FROM_SEGMENTATION:
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise _Invalid(f"must be a list of {{\"value\", \"name\", \"color\"}} or \"{LABELS_FROM_SEGMENTATION}\"")
    try:
        return check_label_table(value)
    except LabelError as exc:
        raise _Invalid(str(exc)) from None


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

_F, _S, _E = ("finetune",), ("segment",), ("export",)

SETTINGS: Tuple[Setting, ...] = (
    # every command
    Setting("version", integer(1, 10 ** 6), JOB_VERSION, "job file format version"),
    Setting("command", choice(COMMANDS), None, "finetune, segment or export", required=True),
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
    Setting("rank_stable", boolean, False, "tcurlora: scale each stack's update by sqrt(8 / its rank), so that a "
            "step moves it as far at any rank as at rank 8 (rsLoRA's rule; for the orthonormal basis)", _F),
    Setting("selection", choice(CORE_SELECTIONS), "deterministic", "tcurlora's columns and rows of W: deterministic "
            "(default: by energy, as the paper), sampled (CURLoRA's draw) or gradient (by alignment with the task's "
            "first gradient on the training patches)", _F, flag="--selection"),
    Setting("norm_scale_shift", boolean, False, "tcurlora: also train a per-channel scale and shift after each "
            "normalisation layer of the base's decoder (SSF; a few thousand values)", _F),
    Setting("new_label_recipe", boolean, True, "tcurlora with a label the base lacks: train it with the "
            "new-structure recipe (" + ", ".join(f"{k} {v}" for k, v in NEW_LABEL_RECIPE.items()) + ", and a rank "
            f"budget within 1/{NEW_LABEL_VALUE_SHARE} of LoRA's values) in each of those options left at its "
            "default; false: exactly the options given", _F),
    Setting("head_start", choice(HEAD_STARTS), "auto", "where a label the base lacks starts in the new head: auto "
            "(default: the method's own; " + ", ".join(f"{m} {t.head_start}" for m, t in METHOD_TRAITS.items())
            + "), prototype (at the label's mean feature inside the training masks, against the background's) or "
            "low-prior (a copy of the background at 1 %: it predicts none of the label)", _F, flag="--head-start"),
    Setting("rank_budget", optional(integer(1, 10 ** 8)), None, "tcurlora: raise stack ranks until the cores hold at "
            "most N values, the decoder's stacks first (default: every stack at --rank)", _F, flag="--rank-budget",
            cli_type=int, metavar="N"),
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
    Setting("output", text, None, "segment: output file (one input) or folder (several); export: the folder the "
            "exported model goes into", _S + _E, required=True),
    Setting("adapter", optional(text), None, "a tCURLoRA adapter for this base (export: required)", _S + _E,
            flag="--adapter", metavar="ADAPTER.safetensors"),
    Setting("tta", optional(boolean), None, "average over mirrored inputs; null: the base's own default (nnU-Net "
            "mirrors when its trainer allows, as nnUNetv2_predict does; the others do not)", _S),
    Setting("largest_component", optional(boolean), None, "keep only the largest connected component per label "
            "(null: the base's choice for its own labels; an adapter's new labels keep every component)", _S),
    Setting("probabilities", boolean, False, "also write class probabilities (NIfTI)", _S),
    Setting("sw_batch_size", integer(1, MAX_BATCH), 1, "sliding-window batch (default 1)", _S,
            flag="--sw-batch-size", cli_type=int),
    Setting("overlap", optional(number(0.0, 0.95)), None, "sliding-window overlap 0..0.95 (default: the base "
            "model's own, 0.25 unless it says otherwise)", _S,
            flag="--overlap", cli_type=float),
    # export
    Setting("format", optional(choice(EXPORT_FORMATS)), None, "the format to write (default: the base's own)", _E,
            flag="--format"),
)

SETTINGS_BY_KEY: Dict[str, Setting] = {s.key: s for s in SETTINGS}

#: The keys ``tcurlora.train.FinetuneOptions`` holds (the training settings proper; not files).
FINETUNE_OPTION_KEYS = ("method", "rank", "preset", "steps", "lr", "weight_decay", "batch_size", "patch_size",
                        "val_every", "patience", "seed", "device", "bf16", "checkpointing", "grad_accum",
                        "train_modules", "checkpoint_every", "basis", "rank_stable", "selection", "norm_scale_shift",
                        "rank_budget", "new_label_recipe", "head_start")


def default(key: str) -> Any:
    """The default value of a job key (a fresh list for list-valued keys)."""
    return SETTINGS_BY_KEY[key].default_value()


def bounds(key: str) -> Tuple[Any, Any]:
    """(lowest, highest) value of a numeric job key (the Slicer modules bound their fields with it)."""
    return SETTINGS_BY_KEY[key].check.bounds


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
        names = [f'"{c}"' for c in COMMANDS]
        raise TCURLoRAError(f"{prefix}job needs \"command\": {', '.join(names[:-1])} or {names[-1]}")
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
