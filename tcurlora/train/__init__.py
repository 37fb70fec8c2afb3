"""Fine-tuning: cases -> adapter file (:func:`finetune`), with events, checkpoints, resume and a training curve.

* :mod:`.options` — what a run takes and gives: :class:`FinetuneOptions`, the run's files, metrics, result;
* :mod:`.cases` — the run's cases, read, checked and in model space, their labels as output channels;
* :mod:`.setup` — the run set up: every check first (label table, cases, configuration), then the adapter put in;
* :mod:`.checkpoint` — the resumable checkpoint and the run record it is bound to;
* :mod:`.loss` — the loss (Dice + cross-entropy over the annotated voxels);
* :mod:`.loop` — the optimisation state, one step, validation and the loop;
* :mod:`.curve` — the training-curve PNG;
* :mod:`.run` — :func:`finetune`: the phases of one run, and its outputs.
"""

from ..labels import same_labels, split_ignore
from .cases import Case, load_cases
from .checkpoint import load_checkpoint, run_differences, run_record, save_checkpoint
from .curve import write_curve
from .loop import Training, start_training, train_loop
from .loss import IGNORE_INDEX, DiceCEOnAnnotated
from .options import FinetuneOptions, FinetuneResult, RunFiles, TrainingMetrics, checkpoint_path, curve_path
from .run import finetune, finish_run
from .setup import (Run, adapt_network, build_adapter_config, enable_activation_checkpointing, resolve_labels,
                    seed_everything, set_up_run, training_preprocessing)

__all__ = ["Case", "DiceCEOnAnnotated", "FinetuneOptions", "FinetuneResult", "IGNORE_INDEX", "Run", "RunFiles",
           "Training", "TrainingMetrics", "adapt_network", "build_adapter_config", "checkpoint_path", "curve_path",
           "enable_activation_checkpointing", "finetune", "finish_run", "load_cases", "load_checkpoint",
           "resolve_labels", "run_differences", "run_record", "same_labels", "save_checkpoint", "seed_everything",
           "set_up_run", "split_ignore", "start_training", "train_loop", "training_preprocessing", "write_curve"]
