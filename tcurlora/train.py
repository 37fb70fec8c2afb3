"""Fine-tuning: cases -> adapter file, with events, periodic crash-safe checkpoints, resume and a training curve.

:func:`finetune` reads in order: settings, output folder (writable?), label table, every case, the checkpoint
to resume from (is it this run's?); only then does it adapt the network and train. Any problem before the
first step is one :class:`TCURLoRAError` line; nothing is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__, distributed, protocol
from .adapter import (adapter_state_dict, describe_adapter, inject_adapter, load_adapter_state_dict, merge_adapter,
                      trainable_parameter_count, unmerge_adapter)
from .adapter_file import base_fingerprint, load_adapter, save_adapter
from .tuners import get_tuner
from .atomic import atomic_write, check_writable
from .config import TCURLoRAConfig
from .errors import InputError, TCURLoRAError
from .events import Events, StopRequested
from .models import BaseModel
from .protocol import DEFAULT_LR, FINETUNE_OPTION_KEYS, NEW_HEAD_LR
from .tuners.layers import unwrap
from .tuners.stacks import find
from .tuners.head_start import start_at_prototypes
from .tuners.strategies import PEFT_METHODS, output_dim, start_new_head
from .runtime import StopWatch, sliding_window_probabilities, with_oom_fallback

CHECKPOINT_FORMAT = 2


@dataclass
class FinetuneOptions:
    """Training settings; defaults, ranges and messages come from :mod:`tcurlora.protocol` (the same the
    CLI flags and job files use). Invalid values raise :class:`tcurlora.protocol.SettingError`."""

    method: str = protocol.default("method")
    rank: int = protocol.default("rank")
    preset: str = protocol.default("preset")
    steps: int = protocol.default("steps")
    lr: Optional[float] = protocol.default("lr")
    weight_decay: float = protocol.default("weight_decay")
    batch_size: int = protocol.default("batch_size")
    patch_size: Optional[Tuple[int, int, int]] = protocol.default("patch_size")
    val_every: int = protocol.default("val_every")
    patience: int = protocol.default("patience")
    seed: int = protocol.default("seed")
    device: str = protocol.default("device")
    bf16: bool = protocol.default("bf16")
    checkpointing: bool = protocol.default("checkpointing")
    grad_accum: int = protocol.default("grad_accum")
    train_modules: List[str] = field(default_factory=lambda: protocol.default("train_modules"))
    checkpoint_every: Optional[int] = protocol.default("checkpoint_every")
    basis: str = protocol.default("basis")

    def __post_init__(self) -> None:
        checked = protocol.validate_settings(dataclasses.asdict(self), FINETUNE_OPTION_KEYS)
        if checked["patch_size"] is not None:
            checked["patch_size"] = tuple(checked["patch_size"])
        for key, value in checked.items():
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_job(cls, job: dict) -> "FinetuneOptions":
        """The options of a validated job dictionary (see :func:`tcurlora.protocol.validate_job`)."""
        return cls(**{k: job[k] for k in FINETUNE_OPTION_KEYS if job.get(k) is not None})

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass
class Case:
    image_path: str
    label_path: str
    image: torch.Tensor  # [1, D, H, W] model space
    label: torch.Tensor

    def digest(self) -> str:
        """sha256 of what training sees (the prepared image and label), independent of file names."""
        h = hashlib.sha256()
        for t in (self.image, self.label):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


@dataclass
class RunFiles:
    """The files of one training run, all named from the adapter's full file name."""

    adapter: Path
    checkpoint: Path
    curve: Path

    @classmethod
    def for_adapter(cls, out) -> "RunFiles":
        out = Path(out)
        if not out.name.endswith(protocol.ADAPTER_SUFFIX) or out.name == protocol.ADAPTER_SUFFIX:
            raise TCURLoRAError(f"{out.name}: the adapter file must end in {protocol.ADAPTER_SUFFIX}")
        stem = out.name[: -len(protocol.ADAPTER_SUFFIX)]  # site.v2.safetensors -> site.v2 (not site)
        return cls(out, out.with_name(stem + ".checkpoint.pt"), out.with_name(stem + ".curve.png"))


def checkpoint_path(out) -> Path:
    return RunFiles.for_adapter(out).checkpoint


def curve_path(out) -> Path:
    return RunFiles.for_adapter(out).curve


@dataclass
class TrainingMetrics:
    steps: int
    total_steps: int
    seconds: float
    trainable_values: int
    final_loss: Optional[float]
    best_validation_dice: Optional[float]
    best_step: Optional[int]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["validation_dice"] = self.best_validation_dice  # the Dice of the saved adapter (what Slicer shows)
        return out


@dataclass
class FinetuneResult:
    files: RunFiles
    metrics: TrainingMetrics
    cancelled: bool

    @property
    def outputs(self) -> Dict[str, Path]:
        """What the run wrote: the checkpoint always; adapter and curve when it finished."""
        out = {"checkpoint": self.files.checkpoint}
        if not self.cancelled:
            out.update(adapter=self.files.adapter, curve=self.files.curve)
        return out

    def metrics_dict(self) -> dict:
        return self.metrics.to_dict()


# ----------------------------------------------------------------------------------------------------------
# before training: labels, cases, adapter configuration


def resolve_labels(base: BaseModel, labels: Optional[Sequence[dict]], first_label: Optional[str]) -> List[dict]:
    """The adapter's label table: given, or from the first Slicer segmentation ("from-segmentation"), or the base's."""
    from .io import label_table_from_segmentation, validate_label_table

    if labels == protocol.LABELS_FROM_SEGMENTATION:
        if not first_label or not str(first_label).endswith(".seg.nrrd"):
            raise TCURLoRAError("labels 'from-segmentation' needs .seg.nrrd label files")
        return label_table_from_segmentation(first_label)
    if labels:
        return validate_label_table(labels)
    return [dict(l) for l in base.labels]


def split_ignore(table: Sequence[dict]) -> Tuple[List[dict], Optional[int]]:
    """A label table -> (its classes, the value of its ``ignore`` label or None)."""
    ignore = [l for l in table if l["name"].lower() == protocol.IGNORE_LABEL]
    return [dict(l) for l in table if l not in ignore], (int(ignore[0]["value"]) if ignore else None)


def same_labels(a: Sequence[dict], b: Sequence[dict]) -> bool:
    return [(l["value"], l["name"].lower()) for l in a] == [(l["value"], l["name"].lower()) for l in b]


def load_cases(base: BaseModel, pairs: Sequence[Tuple[str, str]], labels: List[dict], what: str = "training") -> List[Case]:
    """Read and check every case before any training starts; errors name the file.  ``labels`` is the whole
    table (its ``ignore`` label too); the cases' labels come back as channel indices (:func:`_encode_labels`)."""
    from .io import read_image, read_label

    if not pairs and what == "training":
        raise TCURLoRAError("no training cases given (use --image/--label, --cases FOLDER or a job file)")
    classes, ignore_value = split_ignore(labels)
    cases = []
    for image_path, label_path in pairs:
        image = read_image(image_path)
        label = read_label(label_path, image, labels, image_path=image_path)
        x, y, _ = base.prepare(image, label)
        if not bool(((y > 0) & (y != ignore_value)).any()):
            raise InputError(label_path, "the label is empty after preprocessing (outside the model's field of view)")
        cases.append(Case(str(image_path), str(label_path), x.float(), _encode_labels(y.long(), classes, ignore_value)))
    return cases


#: What an ``ignore`` voxel becomes in training targets: below background, so patch sampling counts it as
#: background and nearest-neighbour resizing keeps it.
IGNORE_INDEX = -1


def _encode_labels(y: torch.Tensor, classes: List[dict], ignore_value: Optional[int] = None) -> torch.Tensor:
    """Label values -> channel indices 1..N in table order (values need not be contiguous); the ignore
    label's voxels -> :data:`IGNORE_INDEX`."""
    out = torch.zeros_like(y)
    for i, entry in enumerate(classes, start=1):
        out[y == int(entry["value"])] = i
    if ignore_value is not None:
        out[y == ignore_value] = IGNORE_INDEX
    return out


def _warn_absent_labels(cases: Sequence[Case], table: List[dict], events: Events) -> None:
    seen = set()
    for c in cases:
        seen |= set(int(v) for v in torch.unique(c.label).tolist())
    absent = [entry["name"] for i, entry in enumerate(table, start=1) if i not in seen]
    if absent:
        events.warning(f"label(s) {', '.join(absent)} occur in no training case: the adapter cannot learn them")


def _start_new_head(network: torch.nn.Module, base: BaseModel, table: List[dict],
                    cases: Sequence[Case] = (), prep=None, seed: int = 0) -> None:
    """A fresh adapter's new head (labels that differ from the base's): each label starts from the base's
    channel of the same name, a label new to the base from its background at a low prior
    (:func:`~tcurlora.tuners.strategies.start_new_head`), then, given training ``cases`` (and their ``prep``),
    at its prototype in the base's last-decoder features (:mod:`tcurlora.tuners.head_start`)."""
    head = get_tuner(network).record("finetune").new_head()
    if head is None:
        return
    base_head = unwrap(find(network, str(base.head)))
    channels = base_head.weight.shape[output_dim(base_head)]
    known = {str(entry["name"]).casefold(): i for i, entry in enumerate(base.labels, start=1) if i < channels}
    sources = [0] + [known.get(str(entry["name"]).casefold()) for entry in table]
    start_new_head(head, base_head, sources)
    new = [i for i, source in enumerate(sources) if source is None]
    if new and cases and prep is not None:
        start_at_prototypes(network, head, new, _prototype_patches(cases, prep, table, seed), ignore_index=IGNORE_INDEX)


def _prototype_patches(cases: Sequence[Case], prep, table: List[dict], seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Patches the new head's prototypes are measured on: drawn as training draws them, without augmentation,
    from a stream of their own (the training steps' randomness is untouched)."""
    from .preprocess import train_transforms
    from .tuners.head_start import PROTOTYPE_PATCHES

    transforms = train_transforms(prep, num_samples=1, label_table=table, augment=False)
    transforms.set_random_state(seed=seed % (2 ** 32))
    whole = all(all(n <= p for n, p in zip(c.image.shape[1:], prep.patch_size)) for c in cases)
    patches = []  # a case no larger than the patch gives the same patch every time: once is enough
    for i in range(min(len(cases), PROTOTYPE_PATCHES) if whole else PROTOTYPE_PATCHES):
        case = cases[i % len(cases)]
        patch = transforms({"image": case.image, "label": case.label})[0]
        patches.append((patch["image"][None], patch["label"][None]))
    return patches


def build_adapter_config(base: BaseModel, options: FinetuneOptions, labels: List[dict]) -> TCURLoRAConfig:
    train_modules = list(options.train_modules)
    if options.method == "decoder" and not train_modules:
        if not base.decoder_modules:
            raise TCURLoRAError(f"base {base.name} declares no decoder modules; pass --train-modules")
        train_modules = list(base.decoder_modules)
    new_head = None
    if not same_labels(labels, base.labels):
        if not base.head:
            raise TCURLoRAError(f"these labels differ from base {base.name}'s, and the base declares no output head to replace")
        new_head = {"module": base.head, "out_channels": len(labels) + 1}
    preset, targets = adapted_layers(base, options.preset)
    return TCURLoRAConfig(method=options.method, preset=preset, rank=options.rank, seed=options.seed, basis=options.basis,
                          train_modules=train_modules if options.method != "full" else [], new_head=new_head,
                          target_modules=targets)


def adapted_layers(base: BaseModel, preset: str) -> Tuple[str, List[str]]:
    """A job's preset -> the tuner's (preset, target_modules).

    ``decoder``: only the conv stacks of the base's decoder modules, so backward stops at the decoder (on
    deepbet at 128³ a CPU step then costs half of full fine-tuning, against about as much for every conv
    stack; but on the demo's task it levelled off at Dice 0.954 where every stack reached 0.965, so ``auto``
    keeps every stack and the decoder is the user's choice for speed).
    """
    if preset != "decoder":
        return preset, []
    if not base.decoder_modules:
        raise TCURLoRAError(f"base {base.name} declares no decoder modules: use --preset conv (or auto)")
    return "conv", list(base.decoder_modules)


def training_preprocessing(base: BaseModel, options: FinetuneOptions):
    """The base's preprocessing with the run's patch size (checked against what the base can take)."""
    prep = dataclasses.replace(base.preprocessing)
    if options.patch_size:
        patch = protocol.check_patch_size(options.patch_size, int(prep.divisible_by))
        prep = type(prep).from_dict({**prep.to_dict(), "patch_size": list(patch)})
    return prep


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# the run record a checkpoint is bound to

#: Options that may change between a stopped run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("device", "checkpoint_every")


def run_record(files: RunFiles, train_cases: Sequence[Case], val_cases: Sequence[Case], options: FinetuneOptions,
               config: TCURLoRAConfig, table: List[dict], base_id: str) -> dict:
    """What makes a run this run: its adapter path, its data (content hashes), settings, labels and base."""
    def cases(cs):
        return [{"image": Path(c.image_path).name, "label": Path(c.label_path).name, "sha256": c.digest()} for c in cs]

    settings = {k: v for k, v in options.to_dict().items() if k not in RESUMABLE_CHANGES}
    return {"adapter": str(files.adapter.resolve()), "cases": cases(train_cases), "validation": cases(val_cases),
            "settings": _plain(settings), "config": _plain(config.to_dict()), "labels": _plain(table),
            "base": base_id}


def _plain(value):
    """JSON-like plain values (tuples -> lists), as a checkpoint stores and loads them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_differences(saved: dict, current: dict) -> List[str]:
    """Human-readable differences between two run records (empty: the same run)."""
    diffs = []
    if saved.get("adapter") != current["adapter"]:
        diffs.append(f"it was written for {saved.get('adapter')}")
    for key, what in (("cases", "training cases"), ("validation", "validation cases")):
        old, new = saved.get(key) or [], current[key]
        if [c["sha256"] for c in old] != [c["sha256"] for c in new]:
            diffs.append(f"its {what} differ ({', '.join(c['image'] for c in old) or 'none'} then, "
                         f"{', '.join(c['image'] for c in new) or 'none'} now)")
    old_settings, new_settings = saved.get("settings") or {}, current["settings"]
    changed = [f"{k} {old_settings.get(k)!r} -> {new_settings.get(k)!r}"
               for k in sorted(set(old_settings) | set(new_settings)) if old_settings.get(k) != new_settings.get(k)]
    if changed:
        diffs.append("settings differ: " + ", ".join(changed))
    if saved.get("config") != current["config"] and not changed:
        diffs.append("the adapter configuration differs")
    if saved.get("labels") != current["labels"]:
        diffs.append("the label table differs")
    if saved.get("base") != current["base"]:
        diffs.append("the base model differs")
    return diffs


def load_checkpoint(path: Path, record: dict) -> dict:
    """The checkpoint at ``path`` if it belongs to the run ``record`` describes; one clear line otherwise."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise TCURLoRAError(f"{path.name}: cannot read this checkpoint ({type(exc).__name__}); train without "
                            "--resume") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "run" not in state:
        raise TCURLoRAError(f"{path.name}: not a checkpoint of this tcurlora version; train without --resume")
    diffs = run_differences(state["run"], record)
    if diffs:
        raise TCURLoRAError(f"{path.name}: belongs to another run, not resumed: {'; '.join(diffs)}. Resume with the "
                            "same files and settings, or train without --resume")
    return state


def _checkpoint_bytes(network: torch.nn.Module) -> int:
    """An upper estimate of the run's outputs on disk: checkpoint (state, two AdamW moments, best copy),
    adapter file and curve."""
    trained = sum(p.numel() * p.element_size() for p in network.parameters() if p.requires_grad)
    return 6 * trained + 4 * 2 ** 20


class _CheckpointSchedule:
    """Every ``every`` steps, or (None) whenever ``interval_s`` seconds have passed since the last save."""

    def __init__(self, every: Optional[int], interval_s: Optional[float] = None) -> None:
        self.every = every
        self.interval_s = protocol.CHECKPOINT_INTERVAL_S if interval_s is None else interval_s
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every:
            return step % self.every == 0
        return time.monotonic() - self.last >= self.interval_s

    def saved(self) -> None:
        self.last = time.monotonic()


# ----------------------------------------------------------------------------------------------------------
# training


STACK_PARAMETERS = ("delta_u", "principal_left", "principal_right")


def _core_parameters(network: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The stack parameters: tCURLoRA/CURLoRA cores Δ𝒰, LoRA-PT's 𝒜 and ℬ (they learn at the method's rate;
    fully trained weights at the decoder rate)."""
    return [p for name, p in network.named_parameters()
            if p.requires_grad and name.rsplit(".", 1)[-1] in STACK_PARAMETERS]


def _dice_per_label(pred: torch.Tensor, ref: torch.Tensor, n: int) -> float:
    annotated = ref != IGNORE_INDEX
    scores = []
    for c in range(1, n + 1):
        a, b = (pred == c) & annotated, ref == c
        denom = int(a.sum()) + int(b.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom)
    return float(np.mean(scores))


class DiceCEOnAnnotated(torch.nn.Module):
    """MONAI's Dice + cross-entropy (softmax, one-hot target) over the annotated voxels only: targets equal to
    :data:`IGNORE_INDEX` count in neither term.  Without such voxels it is exactly ``DiceCELoss``."""

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceCELoss, MaskedDiceLoss

        # Dice over the labels, not the background, pooled over the batch (nnU-Net's own choice): with the
        # background in the mean, a small structure's term is one of two and the loss sits at 0.5 with it
        # unfound (a 16 ml lesion on deepbet never left that plateau in 300 steps)
        dice = {"include_background": False, "batch": True}
        self.plain = DiceCELoss(to_onehot_y=True, softmax=True, **dice)
        # one-hot before masking: MaskedDiceLoss(to_onehot_y=True) would one-hot the masked target, turning
        # every ignored voxel into background
        self.dice = MaskedDiceLoss(softmax=True, **dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        annotated = target != IGNORE_INDEX
        if bool(annotated.all()):
            return self.plain(logits, target)
        if not bool(annotated.any()):  # a patch drawn wholly from unannotated voxels teaches nothing
            return logits.sum() * 0.0
        from monai.networks.utils import one_hot

        target = torch.where(annotated, target, torch.zeros_like(target))
        ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), reduction="none")
        dice = self.dice(logits, one_hot(target, logits.shape[1]), mask=annotated)
        return dice + ce[annotated[:, 0]].mean()


class Training:
    """The optimisation state of one run (what a checkpoint holds) and one training step at a time.

    Every step's randomness depends only on (seed, step), so a run stopped and resumed from a checkpoint
    ends where an uninterrupted one does.
    """

    def __init__(self, base: BaseModel, network: torch.nn.Module, config: TCURLoRAConfig, options: FinetuneOptions,
                 prep, table: List[dict], train_cases: List[Case], val_cases: List[Case], device: torch.device,
                 events: Events, ctx: Optional[distributed.Context] = None) -> None:
        from monai.losses import DeepSupervisionLoss

        from .preprocess import train_transforms

        self.base, self.network, self.config, self.options = base, network, config, options
        self.table, self.train_cases, self.val_cases, self.events = table, train_cases, val_cases, events
        self.device, self.amp = device, device.type == "cuda" and options.bf16
        self.ctx = ctx or distributed.Context(device=device)
        self.model = self.ctx.wrap(network)  # what training forwards run through (DistributedDataParallel across ranks)
        self.prep = prep
        self.lr = options.learning_rate()
        cores = _core_parameters(network)
        tuner = get_tuner(network, create=False)
        head = tuner.record().new_head() if tuner is not None and tuner.active else None
        head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
        own = {id(p) for p in cores + head_params}
        others = [p for p in network.parameters() if p.requires_grad and id(p) not in own]
        groups = [g for g in ({"params": cores, "lr": self.lr},
                              {"params": head_params, "lr": NEW_HEAD_LR},
                              {"params": others, "lr": self.lr if not cores else min(self.lr, DEFAULT_LR["decoder"])})
                  if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
        steps = options.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: (1 - min(s, steps) / (steps + 1)) ** 0.9)
        # deep-supervision nets (SegResNetDS) return one output per level in train mode: weighted sum over the
        # levels, the target resized to each (what Auto3DSeg's own trainer does); a single output passes through
        self.loss_fn = DeepSupervisionLoss(DiceCEOnAnnotated())
        self._make_transforms = lambda prep: train_transforms(prep, num_samples=options.batch_size, label_table=table)
        self.transforms = self._make_transforms(prep)
        self.history = {"loss": [], "val_dice": []}
        self.best_dice, self.best_step, self.best_state = -1.0, 0, None
        self.since_best = 0  # validations without a new best (early stopping)
        self.step = 0

    # -- checkpoint state

    def state_dict(self) -> dict:
        return {"step": self.step, "adapter": {k: v.cpu() for k, v in adapter_state_dict(self.network).items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "history": {k: [list(x) for x in v] for k, v in self.history.items()},
                "best_dice": self.best_dice, "best_step": self.best_step, "best_adapter": self.best_state,
                "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        load_adapter_state_dict(self.network, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = {k: [tuple(x) for x in state["history"][k]] for k in ("loss", "val_dice")}
        self.best_dice, self.best_step = state["best_dice"], state["best_step"]
        self.best_state = state.get("best_adapter")
        self.since_best = int(state.get("since_best", 0))
        self.step = int(state["step"])

    # -- one step

    def train_step(self, step: int) -> float:
        """Forward/backward/update of step ``step``; on CUDA out-of-memory retried with a smaller patch, then
        on the CPU. Returns the loss."""
        def attempt() -> float:
            step_seed = self.options.seed * 1_000_003 + step  # randomness depends only on (seed, step)
            _seed_everything(step_seed)
            self.transforms.set_random_state(seed=step_seed % (2 ** 32))
            rng = np.random.RandomState(step_seed % (2 ** 32))
            self.optimizer.zero_grad(set_to_none=True)
            across = {"ctx": self.ctx} if self.ctx.distributed else {}  # one process: the plain call
            return _accumulate(self.model, self.transforms, self.train_cases, rng, self.loss_fn, self.device,
                               self.amp, self.options, **across)

        def shrink() -> Optional[str]:
            if self.ctx.distributed:  # every rank would have to shrink alike: stop with the error
                raise TCURLoRAError(f"rank {self.ctx.rank}: out of GPU memory; lower --batch-size or --patch-size")
            self.optimizer.zero_grad(set_to_none=True)
            smaller = _smaller_patch(self.prep)
            if smaller is None:
                return None
            self.prep = type(self.prep).from_dict({**self.prep.to_dict(), "patch_size": list(smaller)})
            self.transforms = self._make_transforms(self.prep)
            return f"out of GPU memory: retrying step {step} with patch {'x'.join(map(str, smaller))}"

        def to_cpu() -> None:
            self.device, self.amp = torch.device("cpu"), False
            self.network.to(self.device)
            _optimizer_to(self.optimizer, self.device)

        loss = with_oom_fallback(attempt, shrink, to_cpu, self.events, "the smallest patch")
        self.optimizer.step()
        self.scheduler.step()
        self.step = step
        self.history["loss"].append((step, loss))
        return loss

    def validation_due(self, step: int) -> bool:
        return bool(self.val_cases) and (step % self.options.val_every == 0 or step == self.options.steps)

    def validate(self, step: int) -> float:
        """Mean Dice over the validation cases; keeps the best adapter state."""
        self.network.eval()
        # Merge Δ𝒲 into the weights for the sliding window (else every window rebuilds it); the exact base
        # weights are restored afterwards.  PEFT layers stay unmerged (PEFT cannot merge every conv layer).
        merge = self.config.method not in PEFT_METHODS
        if merge:
            merge_adapter(self.network)
        try:
            scores = []
            for case in self.val_cases[self.ctx.rank::self.ctx.world_size]:  # each rank scores its share
                probs = sliding_window_probabilities(self.network, case.image, self.base.inference_roi, self.device,
                                                     self.amp, overlap=self.base.inference_overlap)
                scores.append(_dice_per_label(probs.argmax(0), case.label[0], len(self.table)))
        finally:
            if merge:
                unmerge_adapter(self.network)
            self.network.train()
        dice = float(np.mean(self.ctx.gather(scores)))
        self.history["val_dice"].append((step, dice))
        if dice > self.best_dice:
            self.best_dice, self.best_step = dice, step
            self.best_state = {k: v.detach().cpu().clone() for k, v in adapter_state_dict(self.network).items()}
            self.since_best = 0
        else:
            self.since_best += 1
        return dice

    def should_stop_early(self) -> bool:
        return bool(self.val_cases and self.options.patience and self.since_best >= self.options.patience)

    def metrics(self, seconds: float, trainable: int) -> TrainingMetrics:
        kept = self.best_state is not None
        return TrainingMetrics(steps=self.step, total_steps=self.options.steps, seconds=round(seconds, 1),
                               trainable_values=trainable,
                               final_loss=self.history["loss"][-1][1] if self.history["loss"] else None,
                               best_validation_dice=self.best_dice if kept else None,
                               best_step=self.best_step if kept else None)


def save_checkpoint(path: Path, training: Training, record: dict) -> None:
    """Write the resumable state atomically (a kill during the write leaves the previous checkpoint)."""
    payload = {"format": CHECKPOINT_FORMAT, "run": record, **training.state_dict()}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _train_loop(training: Training, files: RunFiles, record: dict, stop_file: Optional[str], events: Events) -> bool:
    """Steps from ``training.step + 1`` to the end (or an early stop); True when a stop was requested."""
    options = training.options
    schedule = _CheckpointSchedule(options.checkpoint_every)
    start, t0 = training.step, time.time()
    training.network.train()
    with StopWatch(stop_file) as stop:
        try:
            for step in range(start + 1, options.steps + 1):
                loss = training.train_step(step)
                dice = training.validate(step) if training.validation_due(step) else None
                eta = (time.time() - t0) / (step - start) * (options.steps - step)
                events.progress("train", step, options.steps, loss=loss, dice=dice, eta_s=eta)
                if training.should_stop_early():
                    events.log(f"early stop at step {step}: validation Dice has not improved for {options.patience} "
                               f"validations (best {training.best_dice:.3f} at step {training.best_step})")
                    break
                if training.ctx.any(stop.requested()):
                    raise StopRequested()
                if step < options.steps and schedule.due(step) and training.ctx.is_main:
                    save_checkpoint(files.checkpoint, training, record)
                    schedule.saved()
                    events.log(f"checkpoint at step {step}: {files.checkpoint.name}")
        except StopRequested:
            return True
    return False


def _provenance(training: Training, metrics: TrainingMetrics) -> dict:
    device = training.device
    return {"cases": len(training.train_cases), "validation_cases": len(training.val_cases), "steps": training.step,
            "validation_dice": metrics.best_validation_dice, "seed": training.options.seed,
            "learning_rate": training.lr, "patch_size": list(training.prep.patch_size),
            "software": f"tcurlora {__version__}",
            # a CPU run is bit-reproducible for the same seed AND thread count (reduction order)
            "device": device.type, "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None}


def _read_start(path: str, base: BaseModel, table: List[dict]):
    """The config of the adapter a run continues; refused in one line unless it was trained on this base with
    these labels (its tensors are loaded, with every check of ``load_adapter``, when training starts)."""
    from .manifest import read_manifest

    manifest = read_manifest(path)
    name = Path(path).name
    fingerprint = base_fingerprint(base.network)
    if manifest["base"]["fingerprint"] != fingerprint:
        raise TCURLoRAError(f"{name}: trained on another base model ({manifest['base']['name']}); "
                            f"it cannot be continued on {base.name}")
    if not same_labels(manifest["labels"], table):
        raise TCURLoRAError(f"{name}: its labels ({', '.join(l['name'] for l in manifest['labels'])}) differ from "
                            f"this run's ({', '.join(l['name'] for l in table)})")
    return TCURLoRAConfig.from_dict(manifest["method"]["config"])


def finetune(base: BaseModel, train_pairs: Sequence[Tuple[str, str]], out, *,
             val_pairs: Sequence[Tuple[str, str]] = (), labels=None, options: Optional[FinetuneOptions] = None,
             events: Optional[Events] = None, stop_file: Optional[str] = None, resume: bool = False,
             initial_state: Optional[dict] = None, start_from: Optional[str] = None) -> FinetuneResult:
    """Train an adapter on ``base`` and write it to ``out`` (plus curve PNG and checkpoint beside it).

    ``initial_state`` (an adapter state, e.g. a federated round's global cores) replaces the fresh adapter's.
    ``start_from`` (an adapter file for this base) continues that adapter: its method, stacks, CUR indices and
    trained state replace what ``options`` would build (the correct-and-retrain loop).
    Under ``torchrun`` every rank trains its share of each step and rank 0 writes (:mod:`tcurlora.distributed`).

    Raises :class:`TCURLoRAError` on bad input, always before the first training step.
    """
    options = options or FinetuneOptions()
    events = events or Events()
    files = RunFiles.for_adapter(out)
    if resume and not files.checkpoint.is_file():  # before reading any case: fail fast, with one line
        raise TCURLoRAError(f"{files.checkpoint.name}: no checkpoint to resume from")
    check_writable(files.adapter, what="adapter")
    ctx = distributed.context(options.device)  # one process, or this rank of a torchrun launch
    device = ctx.device
    if not ctx.is_main:
        events = Events()  # rank 0 alone reports
    full_table = resolve_labels(base, labels, train_pairs[0][1] if train_pairs else None)
    table, _ = split_ignore(full_table)  # the adapter's classes; voxels labelled "ignore" are left out of the loss
    if not table:
        raise TCURLoRAError("the label table holds only the 'ignore' label: nothing to learn")
    config = build_adapter_config(base, options, table)
    if start_from:
        config = _read_start(start_from, base, table)
    prep = training_preprocessing(base, options)

    train_cases = load_cases(base, train_pairs, full_table)
    val_cases = load_cases(base, val_pairs, full_table, "validation") if val_pairs else []
    record = run_record(files, train_cases, val_cases, options, config, table, base_fingerprint(base.network))
    state = load_checkpoint(files.checkpoint, record) if resume else None

    network = base.network
    _seed_everything(options.seed)  # new heads and LoRA factors are initialised from the seed
    if start_from:
        load_adapter(network, start_from, adapter_name="finetune")
        for p in get_tuner(network).trainable_parameters():
            p.requires_grad_(True)
        events.log(f"continuing {Path(start_from).name}: {config.method}, rank {config.rank}")
    else:
        inject_adapter(network, config, "finetune")
    network.to(device)
    if not start_from:  # a resumed run or a given state replaces the start: then no prototypes are measured
        fresh = state is None and initial_state is None
        _start_new_head(network, base, table, train_cases if fresh else (), prep, options.seed)
    if initial_state is not None:
        load_adapter_state_dict(network, initial_state)
    if options.checkpointing:
        enable_activation_checkpointing(network)
    check_writable(files.checkpoint, need_bytes=_checkpoint_bytes(network), what="checkpoint")
    # logged after the checks, so that a bad file or setting leaves exactly one line (the error) on the console
    events.log(f"read {len(train_cases)} training and {len(val_cases)} validation case(s)")
    _warn_absent_labels(train_cases, table, events)
    n_trainable = trainable_parameter_count(network)
    info = describe_adapter(network)
    where = (f"{len(info['lora_targets'])} LoRA layers" if "lora_targets" in info
             else f"{len(info['stacks'] or info.get('tsvd_stacks', []))} stacks")
    events.log(f"{config.method}: {n_trainable:,} trainable values ({where}, rank {config.rank}) on {device.type}")

    training = Training(base, network, config, options, prep, table, train_cases, val_cases, device, events, ctx)
    if state is not None:
        training.load_state_dict(state)
        events.log(f"resuming at step {training.step} of {options.steps}")
    t0 = time.time()
    cancelled = _train_loop(training, files, record, stop_file, events)
    if ctx.is_main:
        save_checkpoint(files.checkpoint, training, record)
    metrics = training.metrics(time.time() - t0, n_trainable)
    network.eval()
    if cancelled or not ctx.is_main:
        distributed.finish(ctx)
    if cancelled:
        events.log(f"stopped at step {training.step} of {options.steps}; a checkpoint to resume from is in "
                   f"{files.checkpoint.name}")
        return FinetuneResult(files, metrics, cancelled=True)

    if not ctx.is_main:
        return FinetuneResult(files, metrics, cancelled=False)
    if training.best_state is not None:
        load_adapter_state_dict(network, training.best_state)
    save_adapter(network, files.adapter, labels=table, preprocessing=base.preprocessing.to_dict(),
                 provenance=_provenance(training, metrics), base_name=base.name)
    write_curve(files.curve, training.history,
                f"{config.method} r={config.rank} on {base.name}: {len(train_cases)} case(s)")
    distributed.finish(ctx)
    return FinetuneResult(files, metrics, cancelled=False)


def write_curve(path: Path, history: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    steps, losses = zip(*history["loss"]) if history["loss"] else ((), ())
    ax.plot(steps, losses, color="tab:blue", lw=1, label="training loss (Dice+CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if history["val_dice"]:
        ax2 = ax.twinx()
        vs, vd = zip(*history["val_dice"])
        ax2.plot(vs, vd, "o-", color="tab:red", label="validation Dice")
        ax2.set_ylabel("validation Dice", color="tab:red")
        ax2.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _accumulate(network, transforms, cases, rng, loss_fn, device, amp, options, ctx=None) -> float:
    """Forward/backward of ``grad_accum`` batches of patches (per rank); returns the summed loss.

    Across ranks every rank draws all ``grad_accum × world`` batches of the step and computes its own share
    (see :mod:`tcurlora.distributed`); DDP averages the gradients over ranks.
    """
    ctx = ctx or distributed.Context(device=device)
    count = options.grad_accum * ctx.world_size
    last = max(i for i in range(count) if ctx.mine(i))
    total = 0.0
    for i in range(count):
        case = cases[rng.randint(len(cases))]
        patches = transforms({"image": case.image, "label": case.label})
        if not ctx.mine(i):
            continue  # drawn all the same: every rank's random stream stays in step
        x = torch.stack([p["image"] for p in patches]).to(device)
        y = torch.stack([p["label"] for p in patches]).to(device)
        with ctx.no_sync(network, i == last):  # DDP exchanges gradients after a rank's last batch of the step
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = network(x)
                if isinstance(logits, (list, tuple)):
                    # a new head (new labels) replaces the full-resolution head only: the coarser deep-supervision
                    # heads still predict the base's labels and are left out of the loss
                    logits = [l.float() for l in logits if l.shape[1] == logits[0].shape[1]]
                else:
                    logits = logits.float()
                # (float target: the loss resizes it to each level with nearest interpolation)
                loss = loss_fn(logits, y.float()) / options.grad_accum
            loss.backward()
        total += float(loss.detach())
    return ctx.mean(total)


def _smaller_patch(prep) -> Optional[Tuple[int, ...]]:
    """Half the largest side of the patch (kept divisible), or None when it is already small."""
    div = int(prep.divisible_by)
    patch = list(prep.patch_size)
    i = int(np.argmax(patch))
    half = (patch[i] // 2) // div * div
    if half < max(2 * div, 32):
        return None
    patch[i] = half
    return tuple(patch)


def _optimizer_to(optimizer, device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v):
                state[k] = v.to(device)


def enable_activation_checkpointing(network: torch.nn.Module) -> None:
    """Recompute block activations in backward: the blocks of every ModuleList (ViT/Swin blocks),
    else the root's children (encoder/decoder stages).  Trades compute for memory on small GPUs."""
    from torch.utils.checkpoint import checkpoint

    blocks = [b for m in network.modules() if isinstance(m, torch.nn.ModuleList) for b in m]
    if not blocks:
        blocks = [c for c in network.children() if any(True for _ in c.parameters())]
    for block in blocks:
        plain = block.forward

        def wrapped(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = wrapped
