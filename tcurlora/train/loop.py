"""The optimisation: one run's state (optimizer, schedule, best adapter), its steps, validation and loop."""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

import numpy as np
import torch

from .. import distributed
from ..adapter import adapter_state_dict, load_adapter_state_dict, merge_adapter, unmerge_adapter
from ..errors import TCURLoRAError
from ..events import StopRequested
from ..protocol import METHOD_TRAITS, NEW_HEAD_LR, PEFT_METHODS
from ..runtime import StopWatch, sliding_window_probabilities, with_oom_fallback
from ..tuners import get_tuner
from .checkpoint import CheckpointSchedule, save_checkpoint
from .loss import IGNORE_INDEX, DiceCEOnAnnotated
from .options import TrainingMetrics
from .setup import Run, seed_everything


def _core_parameters(network: torch.nn.Module, method: str) -> List[torch.nn.Parameter]:
    """The method's own trainable tensors (tCURLoRA/CURLoRA cores Δ𝒰, LoRA-PT's 𝒜 and ℬ): they learn at the
    method's rate, fully trained weights at the decoder's. PEFT's LoRA factors are none of these: they learn at
    one rate with the modules trained beside them, as PEFT trains them."""
    traits = METHOD_TRAITS[method]
    if traits.peft:
        return []
    return [p for name, p in network.named_parameters()
            if p.requires_grad and name.rsplit(".", 1)[-1] in traits.tensors]


def _dice_per_label(pred: torch.Tensor, ref: torch.Tensor, n: int) -> float:
    annotated = ref != IGNORE_INDEX
    scores = []
    for c in range(1, n + 1):
        a, b = (pred == c) & annotated, ref == c
        denom = int(a.sum()) + int(b.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom)
    return float(np.mean(scores))


class Training:
    """The optimisation state of one run (what a checkpoint holds) and one training step at a time.

    Every step's randomness depends only on (seed, step), so a run stopped and resumed from a checkpoint
    ends where an uninterrupted one does.
    """

    def __init__(self, run: Run) -> None:
        from monai.losses import DeepSupervisionLoss

        from ..preprocess import train_transforms

        network, config, options, table = run.base.network, run.config, run.options, run.table
        self.run, self.base, self.network, self.config, self.options = run, run.base, network, config, options
        self.table, self.train_cases, self.val_cases, self.events = table, run.train_cases, run.val_cases, run.events
        self.device, self.amp = run.ctx.device, run.ctx.device.type == "cuda" and options.bf16
        self.ctx = run.ctx
        self.model = self.ctx.wrap(network)  # what training forwards run through (DistributedDataParallel across ranks)
        self.prep = run.prep
        self.lr = options.learning_rate()
        cores = _core_parameters(network, config.method)
        tuner = get_tuner(network, create=False)
        head = tuner.record().new_head() if tuner is not None and tuner.active else None
        head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
        own = {id(p) for p in cores + head_params}
        others = [p for p in network.parameters() if p.requires_grad and id(p) not in own]
        decoder_lr = METHOD_TRAITS["decoder"].default_lr
        groups = [g for g in ({"params": cores, "lr": self.lr},
                              {"params": head_params, "lr": NEW_HEAD_LR},
                              {"params": others, "lr": self.lr if not cores else min(self.lr, decoder_lr)})
                  if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
        steps = options.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: (1 - min(s, steps) / (steps + 1)) ** 0.9)
        # deep-supervision nets (SegResNetDS) return one output per level in train mode: weighted sum over the
        # levels, the target resized to each (what Auto3DSeg's own trainer does); a single output passes through
        self.loss_fn = DeepSupervisionLoss(DiceCEOnAnnotated())
        self._make_transforms = lambda prep: train_transforms(prep, num_samples=options.batch_size, label_table=table)
        self.transforms = self._make_transforms(self.prep)
        self.history = {"loss": [], "val_dice": []}
        self.best_dice, self.best_step, self.best_state = -1.0, 0, None
        self.since_best = 0  # validations without a new best (early stopping)
        self.step = 0
        self.seconds = 0.0  # spent in the training loop (by this process, since it started or resumed)

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
            seed_everything(step_seed)
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


def start_training(run: Run) -> Training:
    """The optimisation state of a run: fresh, or the checkpoint's of a resumed run."""
    training = Training(run)
    if run.state is not None:
        training.load_state_dict(run.state)
        run.events.log(f"resuming at step {training.step} of {run.options.steps}")
    return training


def train_loop(training: Training, stop_file: Optional[str]) -> bool:
    """Steps from ``training.step + 1`` to the end (or an early stop), with periodic checkpoints; True when a stop
    was requested."""
    options, events, files, record = training.options, training.events, training.run.files, training.run.record
    schedule = CheckpointSchedule(options.checkpoint_every)
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
                    save_checkpoint(files.checkpoint, training.state_dict(), record)
                    schedule.saved()
                    events.log(f"checkpoint at step {step}: {files.checkpoint.name}")
        except StopRequested:
            return True
        finally:
            training.seconds = time.time() - t0
    return False


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
