"""Fine-tuning: cases -> adapter file, with events, checkpoints, resume and a training curve."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__, distributed
from .adapter import (adapter_state_dict, get_adapter, inject_adapter, load_adapter_state_dict, merge_adapter,
                      trainable_parameter_count, unmerge_adapter)
from .adapter_file import save_adapter
from .io import atomic_write
from .config import TCURLoRAConfig
from .errors import InputError, TCURLoRAError
from .events import Events, StopRequested
from .models import BaseModel

DEFAULT_LR = {"tcurlora": 1e-2, "lora": 1e-3, "decoder": 1e-3, "full": 1e-4}


@dataclass
class FinetuneOptions:
    """Training settings; every field has a default that is sane for a handful of cases on a CPU."""

    method: str = "tcurlora"
    rank: int = 8
    preset: str = "auto"
    steps: int = 100
    lr: Optional[float] = None
    weight_decay: float = 2e-5
    batch_size: int = 2
    patch_size: Optional[Tuple[int, int, int]] = None
    val_every: int = 25
    patience: int = 4
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    checkpointing: bool = False
    grad_accum: int = 1
    train_modules: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Case:
    image_path: str
    label_path: str
    image: torch.Tensor  # [1, D, H, W] model space
    label: torch.Tensor


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TCURLoRAError("--device cuda: no CUDA GPU is available to this torch build")
    if name not in ("cpu", "cuda"):
        raise TCURLoRAError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def resolve_labels(base: BaseModel, labels: Optional[Sequence[dict]], first_label: Optional[str]) -> List[dict]:
    """The adapter's label table: given, or from the first Slicer segmentation ("from-segmentation"), or the base's."""
    from .io import label_table_from_segmentation, validate_label_table

    if labels == "from-segmentation":
        if not first_label or not str(first_label).endswith(".seg.nrrd"):
            raise TCURLoRAError("labels 'from-segmentation' needs .seg.nrrd label files")
        return label_table_from_segmentation(first_label)
    if labels:
        return validate_label_table(labels)
    return [dict(l) for l in base.labels]


def same_labels(a: Sequence[dict], b: Sequence[dict]) -> bool:
    return [(l["value"], l["name"].lower()) for l in a] == [(l["value"], l["name"].lower()) for l in b]


def load_cases(base: BaseModel, pairs: Sequence[Tuple[str, str]], labels: List[dict], what: str = "training") -> List[Case]:
    """Read and check every case before any training starts; errors name the file."""
    from .io import read_image, read_label

    if not pairs and what == "training":
        raise TCURLoRAError("no training cases given (use --image/--label, --cases FOLDER or a job file)")
    cases = []
    for image_path, label_path in pairs:
        image = read_image(image_path)
        label = read_label(label_path, image, labels, image_path=image_path)
        x, y, _ = base.prepare(image, label)
        if int(y.max()) == 0:
            raise InputError(label_path, "the label is empty after preprocessing (outside the model's field of view)")
        cases.append(Case(str(image_path), str(label_path), x.float(), y.long()))
    return cases


def _encode_labels(y: torch.Tensor, labels: List[dict]) -> torch.Tensor:
    """Label values -> channel indices 1..N in table order (values need not be contiguous)."""
    out = torch.zeros_like(y)
    for i, entry in enumerate(labels, start=1):
        out[y == int(entry["value"])] = i
    return out


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
    return TCURLoRAConfig(method=options.method, preset=options.preset, rank=options.rank, seed=options.seed,
                          train_modules=train_modules if options.method != "full" else [], new_head=new_head)


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class _StopWatch:
    """Polls a stop file and catches SIGINT/SIGTERM; restores the old handlers afterwards."""

    def __init__(self, stop_file: Optional[str]) -> None:
        self.stop_file = stop_file
        self.signalled = False
        self._old = {}

    def __enter__(self):
        def handler(signum, frame):
            self.signalled = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. called from a GUI thread): stop file only
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self) -> bool:
        return self.signalled or bool(self.stop_file and os.path.exists(self.stop_file))


class InferenceStopped(Exception):
    """A stop was requested between two sliding windows."""


def sliding_window_probabilities(network, image: torch.Tensor, roi, device, amp: bool, sw_batch_size: int = 1,
                                 overlap: float = 0.25, tta: bool = False,
                                 stop: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """Softmax probabilities [C, D, H, W] of a model-space image (MONAI sliding window, optional flip TTA).

    ``stop`` is asked before every window batch; when it returns True, :class:`InferenceStopped` is raised
    (a large volume with a small window can take minutes, and a cancel should not wait for all of it).
    """
    from monai.inferers import sliding_window_inference

    predictor = network
    if stop is not None:
        def predictor(window):
            if stop():
                raise InferenceStopped()
            return network(window)

    x = image[None].to(device)
    roi = [min(int(r), int(s)) if int(s) >= int(r) else int(r) for r, s in zip(roi, x.shape[2:])]
    flips = [()] + ([(2,), (3,), (4,)] if tta else [])
    total = None
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(xi, roi, sw_batch_size, predictor, overlap=overlap, mode="gaussian")
            p = torch.softmax(logits.float(), 1)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
    return (total / len(flips))[0].cpu()


def _dice_per_label(pred: torch.Tensor, ref: torch.Tensor, n: int) -> float:
    scores = []
    for c in range(1, n + 1):
        a, b = pred == c, ref == c
        denom = int(a.sum()) + int(b.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom)
    return float(np.mean(scores))


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


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name.split(".")[0] + ".checkpoint.pt")


def curve_path(out: Path) -> Path:
    return out.with_name(out.name.split(".")[0] + ".curve.png")


def finetune(base: BaseModel, train_pairs: Sequence[Tuple[str, str]], out, *,
             val_pairs: Sequence[Tuple[str, str]] = (), labels=None, options: Optional[FinetuneOptions] = None,
             events: Optional[Events] = None, stop_file: Optional[str] = None, resume: bool = False,
             initial_state: Optional[dict] = None) -> dict:
    """Train an adapter on ``base`` and write it to ``out`` (plus curve PNG and checkpoint beside it).

    ``initial_state`` (an adapter state, e.g. a federated round's global cores) replaces the fresh adapter's.

    Returns the result dict (outputs, metrics, cancelled).  Raises :class:`TCURLoRAError` on bad input.
    """
    from monai.losses import DiceCELoss

    from .preprocess import train_transforms

    options = options or FinetuneOptions()
    events = events or Events()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise TCURLoRAError(f"{out.name}: the adapter file must end in .safetensors")
    ckpt = checkpoint_path(out)
    if resume and not ckpt.is_file():  # before reading any case: fail fast, with one line
        raise TCURLoRAError(f"{ckpt.name}: no checkpoint to resume from")
    ctx = distributed.context(options.device)  # one process, or this rank of a torchrun launch
    device = ctx.device
    if not ctx.is_main:
        events = Events()  # rank 0 alone reports
    amp = device.type == "cuda" and options.bf16
    table = resolve_labels(base, labels, train_pairs[0][1] if train_pairs else None)
    config = build_adapter_config(base, options, table)

    train_cases = load_cases(base, train_pairs, table)
    val_cases = load_cases(base, val_pairs, table, "validation") if val_pairs else []
    # logged after the checks, so that a bad file leaves exactly one line (the error) on the console
    events.log(f"read {len(train_cases)} training and {len(val_cases)} validation case(s)")
    for c in train_cases + val_cases:
        c.label = _encode_labels(c.label, table)
    seen = set()
    for c in train_cases:
        seen |= set(int(v) for v in torch.unique(c.label).tolist())
    absent = [entry["name"] for i, entry in enumerate(table, start=1) if i not in seen]
    if absent:
        events.warning(f"label(s) {', '.join(absent)} occur in no training case: the adapter cannot learn them")

    network = base.network
    _seed_everything(options.seed)  # new heads and LoRA factors are initialised from the seed
    inject_adapter(network, config, "finetune")
    if initial_state is not None:
        load_adapter_state_dict(network, initial_state)
    network.to(device)
    n_trainable = trainable_parameter_count(network)
    if config.method == "lora":  # PEFT layers, not a tcurlora adapter module
        where = f"{len(network._tcurlora_lora['targets'])} LoRA layers"
    else:
        where = f"{len(get_adapter(network).stacks)} stacks"
    events.log(f"{config.method}: {n_trainable:,} trainable values ({where}, rank {config.rank}) on {device.type}")
    lr = options.lr if options.lr is not None else DEFAULT_LR[config.method]
    # cores learn at the method's rate; modules trained fully (decoder, new head) at the decoder rate
    cores = [s.delta_u for s in get_adapter(network).stacks.values()] if config.method in ("tcurlora", "decoder") else []
    core_ids = {id(p) for p in cores}
    others = [p for p in network.parameters() if p.requires_grad and id(p) not in core_ids]
    groups = [g for g in ({"params": cores, "lr": lr},
                          {"params": others, "lr": lr if not cores else min(lr, DEFAULT_LR["decoder"])}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - min(s, options.steps) / (options.steps + 1)) ** 0.9)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    prep = dataclasses.replace(base.preprocessing)
    if options.patch_size:
        prep = type(prep).from_dict({**prep.to_dict(), "patch_size": list(options.patch_size)})

    history = {"loss": [], "val_dice": []}
    best = {"dice": -1.0, "step": 0, "state": None}
    start = 0
    since_best = 0  # validations without a new best (early stopping); kept in the checkpoint
    if resume:
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        if state["options"]["steps"] != options.steps or state["config"] != config.to_dict():
            raise TCURLoRAError(f"{ckpt.name}: was written by a run with other settings; resume with the same ones")
        load_adapter_state_dict(network, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = {"loss": [tuple(x) for x in state["history"]["loss"]],
                   "val_dice": [tuple(x) for x in state["history"]["val_dice"]]}
        best = {"dice": state["best_dice"], "step": state["best_step"], "state": state.get("best_adapter")}
        since_best = int(state.get("since_best", 0))
        start = int(state["step"])
        events.log(f"resuming at step {start} of {options.steps}")

    def save_checkpoint(step: int) -> None:
        payload = {"step": step, "adapter": {k: v.cpu() for k, v in adapter_state_dict(network).items()},
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "history": {k: [list(x) for x in v] for k, v in history.items()},
                   "best_dice": best["dice"], "best_step": best["step"], "best_adapter": best["state"],
                   "since_best": since_best, "options": options.to_dict(), "config": config.to_dict()}
        atomic_write(ckpt, lambda tmp: torch.save(payload, tmp))

    def validate() -> Optional[float]:
        if not val_cases:
            return None
        network.eval()
        # Merge Δ𝒲 into the weights for the sliding window (else every window rebuilds it); the exact base
        # weights are restored afterwards.  PEFT LoRA unmerges by subtraction (not exact): left unmerged.
        merge = config.method != "lora"
        if merge:
            merge_adapter(network)
        try:
            scores = []
            for case in val_cases[ctx.rank::ctx.world_size]:  # each rank scores its share
                probs = sliding_window_probabilities(network, case.image, base.inference_roi, device, amp)
                scores.append(_dice_per_label(probs.argmax(0), case.label[0], len(table)))
        finally:
            if merge:
                unmerge_adapter(network)
            network.train()
        return float(np.mean(ctx.gather(scores)))

    transforms = train_transforms(prep, num_samples=options.batch_size, label_table=table)
    model = ctx.wrap(network)  # what training forwards run through (DistributedDataParallel across ranks)
    network.train()
    t0 = time.time()
    cancelled = False
    step = start
    with _StopWatch(stop_file) as stop:
        try:
            for step in range(start + 1, options.steps + 1):
                while True:  # one step; on CUDA out-of-memory retried smaller, then on the CPU
                    step_seed = options.seed * 1_000_003 + step  # randomness depends only on (seed, step)
                    _seed_everything(step_seed)
                    transforms.set_random_state(seed=step_seed % (2 ** 32))
                    rng = np.random.RandomState(step_seed % (2 ** 32))
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        total = _accumulate(model, transforms, train_cases, rng, loss_fn, device, amp, options, ctx)
                        break
                    except torch.cuda.OutOfMemoryError:
                        if ctx.distributed:  # every rank would have to shrink alike: stop with the error
                            raise
                        optimizer.zero_grad(set_to_none=True)
                        torch.cuda.empty_cache()
                        smaller = _smaller_patch(prep)
                        if smaller is not None:
                            prep = type(prep).from_dict({**prep.to_dict(), "patch_size": list(smaller)})
                            transforms = train_transforms(prep, num_samples=options.batch_size, label_table=table)
                            events.warning(f"out of GPU memory: retrying step {step} with patch {'x'.join(map(str, smaller))}")
                        else:
                            device, amp = torch.device("cpu"), False
                            network.to(device)
                            _optimizer_to(optimizer, device)
                            events.warning("out of GPU memory at the smallest patch: continuing on the CPU (slower)")
                optimizer.step()
                scheduler.step()
                history["loss"].append((step, total))
                dice = None
                if val_cases and (step % options.val_every == 0 or step == options.steps):
                    dice = validate()
                    history["val_dice"].append((step, dice))
                    if dice > best["dice"]:
                        best = {"dice": dice, "step": step,
                                "state": {k: v.detach().cpu().clone() for k, v in adapter_state_dict(network).items()}}
                        since_best = 0
                    else:
                        since_best += 1
                done = step - start
                eta = (time.time() - t0) / done * (options.steps - step)
                events.progress("train", step, options.steps, loss=total, dice=dice, eta_s=eta)
                if val_cases and options.patience and since_best >= options.patience:
                    events.log(f"early stop at step {step}: validation Dice has not improved for "
                               f"{options.patience} validations (best {best['dice']:.3f} at step {best['step']})")
                    break
                if ctx.any(stop.requested()):
                    raise StopRequested()
        except StopRequested:
            cancelled = True

    if ctx.is_main:
        save_checkpoint(step)
    outputs = {"checkpoint": ckpt}
    metrics = {"steps": step, "total_steps": options.steps, "seconds": round(time.time() - t0, 1),
               "trainable_values": n_trainable, "final_loss": history["loss"][-1][1] if history["loss"] else None,
               "best_validation_dice": best["dice"] if best["state"] is not None else None,
               "best_step": best["step"] if best["state"] is not None else None}
    if cancelled or not ctx.is_main:
        distributed.finish(ctx)
    if cancelled:
        events.log(f"stopped at step {step} of {options.steps}; a checkpoint to resume from is in {ckpt.name}")
        network.eval()
        return {"outputs": outputs, "metrics": metrics, "cancelled": True}

    if best["state"] is not None:
        load_adapter_state_dict(network, best["state"])
    network.eval()
    if not ctx.is_main:
        return {"outputs": {}, "metrics": metrics, "cancelled": False}
    provenance = {"cases": len(train_cases), "validation_cases": len(val_cases), "steps": step,
                  "validation_dice": metrics["best_validation_dice"], "seed": options.seed,
                  "learning_rate": lr, "patch_size": list(prep.patch_size), "software": f"tcurlora {__version__}",
                  # a CPU run is bit-reproducible for the same seed AND thread count (reduction order)
                  "device": device.type, "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None}
    save_adapter(network, out, labels=table, preprocessing=base.preprocessing.to_dict(), provenance=provenance)
    outputs["adapter"] = out
    curve = curve_path(out)
    write_curve(curve, history, f"{config.method} r={config.rank} on {base.name}: {len(train_cases)} case(s)")
    outputs["curve"] = curve
    distributed.finish(ctx)
    return {"outputs": outputs, "metrics": metrics, "cancelled": False}


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
            continue
        x = torch.stack([p["image"] for p in patches]).to(device)
        y = torch.stack([p["label"] for p in patches]).to(device)
        with ctx.no_sync(network, i == last):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = _forward(network, x, options.checkpointing)
                loss = loss_fn(logits.float(), y) / options.grad_accum
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


def _forward(network, x, checkpointing: bool):
    if checkpointing and not getattr(network, "_tcurlora_checkpointing", False):
        enable_activation_checkpointing(network)
    return network(x)


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
    network._tcurlora_checkpointing = True
