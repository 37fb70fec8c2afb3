"""Fine-tuning: cases -> adapter file, with events, periodic crash-safe checkpoints, resume and a training curve.

:func:`finetune` reads in order: settings, output folder (writable?), label table, every case, the checkpoint
to resume from (is it this run's?); only then does it adapt the network and train. Any problem before the
first step is one :class:`TCURLoRAError` line; nothing is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from .. import __version__, distributed
from ..adapter import describe_adapter, inject_adapter, load_adapter_state_dict, trainable_parameter_count
from ..adapter_file import base_fingerprint, load_adapter, save_adapter
from ..atomic import check_writable
from ..errors import TCURLoRAError
from ..events import Events
from ..labels import split_ignore
from ..models import BaseModel
from ..tuners import get_tuner
from .checkpoint import _checkpoint_bytes, load_checkpoint, run_record, save_checkpoint
from .curve import write_curve
from .loop import Training, _train_loop, enable_activation_checkpointing
from .options import FinetuneOptions, FinetuneResult, RunFiles, TrainingMetrics
from .setup import (_read_start, _seed_everything, _start_new_head, _warn_absent_labels, build_adapter_config,
                    load_cases, resolve_labels, training_preprocessing)


def _provenance(training: Training, metrics: TrainingMetrics) -> dict:
    device = training.device
    return {"cases": len(training.train_cases), "validation_cases": len(training.val_cases), "steps": training.step,
            "validation_dice": metrics.best_validation_dice, "seed": training.options.seed,
            "learning_rate": training.lr, "patch_size": list(training.prep.patch_size),
            "software": f"tcurlora {__version__}",
            # a CPU run is bit-reproducible for the same seed AND thread count (reduction order)
            "device": device.type, "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None}


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
        _start_new_head(network, base, table)
    if initial_state is not None:
        load_adapter_state_dict(network, initial_state)
    network.to(device)
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
