"""Fine-tuning: cases -> adapter file (:func:`finetune`), with events, checkpoints, resume and a training curve.

* :mod:`.options` — what a run takes and gives: :class:`FinetuneOptions`, the run's files, metrics, result;
* :mod:`.setup` — before training: label table, cases, adapter configuration, the new head's start;
* :mod:`.checkpoint` — the resumable checkpoint and the run record it is bound to;
* :mod:`.loss` — the loss (Dice + cross-entropy over the annotated voxels);
* :mod:`.loop` — the optimisation state, one step, validation and the loop;
* :mod:`.curve` — the training-curve PNG;
* :mod:`.run` — :func:`finetune`, the phases of one run.
"""

from ..labels import same_labels, split_ignore
from .checkpoint import load_checkpoint, run_differences, run_record, save_checkpoint
from .curve import write_curve
from .loop import Training, enable_activation_checkpointing
from .loss import IGNORE_INDEX, DiceCEOnAnnotated
from .options import FinetuneOptions, FinetuneResult, RunFiles, TrainingMetrics, checkpoint_path, curve_path
from .run import finetune
from .setup import (Case, _seed_everything, build_adapter_config, load_cases, resolve_labels,
                    training_preprocessing)

__all__ = ["Case", "DiceCEOnAnnotated", "FinetuneOptions", "FinetuneResult", "IGNORE_INDEX", "RunFiles", "Training",
           "TrainingMetrics", "build_adapter_config", "checkpoint_path", "curve_path",
           "enable_activation_checkpointing", "finetune", "load_cases", "load_checkpoint", "resolve_labels",
           "run_differences", "run_record", "same_labels", "save_checkpoint", "split_ignore",
           "training_preprocessing", "write_curve"]
