"""Fine-tuning: cases -> adapter file, with events, periodic crash-safe checkpoints, resume and a training curve.

:func:`finetune` is one run's phases: set up (every check first: settings, output folder, label table, every
case, the checkpoint to resume from; any problem is one :class:`TCURLoRAError` line and nothing is written),
adapt the network, start (or resume) the optimisation, the training loop, and the run's outputs.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .. import __version__, distributed
from ..adapter import load_adapter_state_dict, trainable_parameter_count
from ..adapter_file import save_adapter
from ..events import Events
from ..models import BaseModel
from .checkpoint import save_checkpoint
from .curve import write_curve
from .loop import Training, start_training, train_loop
from .options import FinetuneOptions, FinetuneResult, TrainingMetrics
from .setup import Run, adapt_network, set_up_run


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
    run = set_up_run(base, train_pairs, out, val_pairs, labels, options or FinetuneOptions(), events or Events(),
                     resume, start_from)
    adapt_network(run, initial_state)
    training = start_training(run)
    cancelled = train_loop(training, stop_file)
    return finish_run(run, training, cancelled)


def finish_run(run: Run, training: Training, cancelled: bool) -> FinetuneResult:
    """The last checkpoint always; the adapter (its best validated state) and the curve unless stopped."""
    ctx, files, network, events = run.ctx, run.files, run.base.network, run.events
    if ctx.is_main:
        save_checkpoint(files.checkpoint, training.state_dict(), run.record)
    metrics = training.metrics(training.seconds, trainable_parameter_count(network))
    network.eval()
    if cancelled or not ctx.is_main:
        distributed.finish(ctx)
    if cancelled:
        events.log(f"stopped at step {training.step} of {run.options.steps}; a checkpoint to resume from is in "
                   f"{files.checkpoint.name}")
        return FinetuneResult(files, metrics, cancelled=True)

    if not ctx.is_main:
        return FinetuneResult(files, metrics, cancelled=False)
    if training.best_state is not None:
        load_adapter_state_dict(network, training.best_state)
    save_adapter(network, files.adapter, labels=run.table, preprocessing=run.base.preprocessing.to_dict(),
                 provenance=_provenance(training, metrics), base_name=run.base.name)
    write_curve(files.curve, training.history,
                f"{run.config.method} r={run.config.rank} on {run.base.name}: {len(run.train_cases)} case(s)")
    distributed.finish(ctx)
    return FinetuneResult(files, metrics, cancelled=False)


def _provenance(training: Training, metrics: TrainingMetrics) -> dict:
    device = training.device
    return {"cases": len(training.train_cases), "validation_cases": len(training.val_cases), "steps": training.step,
            "validation_dice": metrics.best_validation_dice, "seed": training.options.seed,
            "learning_rate": training.lr, "patch_size": list(training.prep.patch_size),
            "software": f"tcurlora {__version__}",
            # a CPU run is bit-reproducible for the same seed AND thread count (reduction order)
            "device": device.type, "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None}
