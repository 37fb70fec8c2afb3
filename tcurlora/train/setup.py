"""Setting a run up: every check before any work, then the adapter put into the network.

:func:`set_up_run` reads in order: the output folder (writable?), the label table, the adapter configuration,
every case, the checkpoint to resume from (is it this run's?). Any problem is one :class:`TCURLoRAError` line
and nothing is written. :func:`adapt_network` then puts the run's adapter into the base network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import distributed, protocol
from ..adapter import describe_adapter, inject_adapter, load_adapter_state_dict, trainable_parameter_count
from ..adapter_file import base_fingerprint, load_adapter
from ..atomic import check_writable
from ..config import TCURLoRAConfig
from ..errors import TCURLoRAError
from ..events import Events
from ..labels import LABELS_FROM_SEGMENTATION, same_labels, split_ignore
from ..models import BaseModel
from ..preprocess import Preprocessing
from ..tuners import get_tuner
from ..tuners.head_start import PROTOTYPE_PATCHES, start_at_prototypes
from ..tuners.heads import output_dim, start_new_head
from ..tuners.layers import unwrap
from ..tuners.stacks import find
from .cases import Case, load_cases, warn_absent_labels
from .checkpoint import checkpoint_bytes, load_checkpoint, run_record
from .loss import IGNORE_INDEX
from .options import FinetuneOptions, RunFiles


@dataclass
class Run:
    """One run as :func:`set_up_run` checked it: what the phases after the checks read."""

    base: BaseModel
    options: FinetuneOptions
    files: RunFiles
    ctx: distributed.Context  # one process, or this rank of a torchrun launch
    events: Events
    table: List[dict]  # the adapter's classes (voxels labelled "ignore" are left out of the loss)
    config: TCURLoRAConfig
    prep: Preprocessing  # the base's, with the run's patch size
    train_cases: List[Case]
    val_cases: List[Case]
    record: dict  # what makes this run this run: a checkpoint must carry the same
    state: Optional[dict] = None  # the checkpoint a resumed run continues from
    start_from: Optional[str] = None  # the adapter file a run continues training


def set_up_run(base: BaseModel, train_pairs: Sequence[Tuple[str, str]], out, val_pairs: Sequence[Tuple[str, str]],
               labels, options: FinetuneOptions, events: Events, resume: bool, start_from: Optional[str]) -> Run:
    """Every check of a run, before anything is written or trained (see the module docstring)."""
    files = RunFiles.for_adapter(out)
    if resume and not files.checkpoint.is_file():  # before reading any case: fail fast, with one line
        raise TCURLoRAError(f"{files.checkpoint.name}: no checkpoint to resume from")
    check_writable(files.adapter, what="adapter")
    ctx = distributed.context(options.device)
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
    return Run(base, options, files, ctx, events, table, config, prep, train_cases, val_cases, record, state,
               start_from)


def adapt_network(run: Run, initial_state: Optional[dict] = None) -> None:
    """Put the run's adapter into the base network, on the run's device: a fresh one (its new head started),
    the adapter file the run continues, or ``initial_state`` (a federated round's global cores); then check
    that the checkpoint fits on the disk and say what trains."""
    network, options, config, events = run.base.network, run.options, run.config, run.events
    if not get_tuner(network).base_info:  # a network put into the base after loading (a copy) has no introduction
        run.base.introduce()
    seed_everything(options.seed)  # new heads and LoRA factors are initialised from the seed
    if run.start_from:
        load_adapter(network, run.start_from, adapter_name="finetune")
        for p in get_tuner(network).trainable_parameters():
            p.requires_grad_(True)
        events.log(f"continuing {Path(run.start_from).name}: {config.method}, rank {config.rank}")
    else:  # columns and rows by gradient are chosen once the head has started: first the energy's, then those
        by_gradient = config.selection == "gradient"
        if by_gradient and initial_state is not None:
            raise TCURLoRAError("selection 'gradient' picks each site's own columns and rows, and the sites of a "
                                "federated run must share one layout: use selection 'deterministic'")
        inject_adapter(network, dataclasses.replace(config, selection="deterministic") if by_gradient else config,
                       "finetune")
    network.to(run.ctx.device)
    if not run.start_from:  # a resumed run or a given state replaces the start: then no prototypes are measured
        fresh = run.state is None and initial_state is None
        patches = _Patches(run.train_cases, run.prep, run.table, options.seed)
        # a resumed run with columns by gradient starts its head again to pick the same ones
        at_prototypes = options.new_head_start() == "prototype" and (fresh or by_gradient)
        _start_new_head(network, run.base, run.table, patches if at_prototypes else None)
        if by_gradient:
            _select_by_gradient(network, config, patches())
    if initial_state is not None:
        load_adapter_state_dict(network, initial_state)
    if options.checkpointing:
        enable_activation_checkpointing(network)
    check_writable(run.files.checkpoint, need_bytes=checkpoint_bytes(network), what="checkpoint")
    # logged after the checks, so that a bad file or setting leaves exactly one line (the error) on the console
    events.log(f"read {len(run.train_cases)} training and {len(run.val_cases)} validation case(s)")
    warn_absent_labels(run.train_cases, run.table, events)
    info = describe_adapter(network)
    where = (f"{len(info['lora_targets'])} LoRA layers" if "lora_targets" in info
             else f"{len(info['stacks'] or info.get('tsvd_stacks', []))} stacks")
    events.log(f"{config.method}: {trainable_parameter_count(network):,} trainable values ({where}, rank "
               f"{config.rank}) on {run.ctx.device.type}")


def resolve_labels(base: BaseModel, labels: Optional[Sequence[dict]], first_label: Optional[str]) -> List[dict]:
    """The adapter's label table: given, or from the first Slicer segmentation ("from-segmentation"), or the base's."""
    from ..io import label_table_from_segmentation, validate_label_table

    if labels == LABELS_FROM_SEGMENTATION:
        if not first_label or not str(first_label).endswith(".seg.nrrd"):
            raise TCURLoRAError("labels 'from-segmentation' needs .seg.nrrd label files")
        return label_table_from_segmentation(first_label)
    if labels:
        return validate_label_table(labels)
    return [dict(l) for l in base.labels]


class _Patches:
    """The training patches a run's start measures on (:func:`_prototype_patches`), drawn once when first asked."""

    def __init__(self, cases: Sequence[Case], prep: Preprocessing, table: List[dict], seed: int) -> None:
        self.cases, self.prep, self.table, self.seed, self._drawn = cases, prep, table, seed, None

    def __call__(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        if self._drawn is None:
            self._drawn = _prototype_patches(self.cases, self.prep, self.table, self.seed) if self.cases else []
        return self._drawn


def _select_by_gradient(network: torch.nn.Module, config: TCURLoRAConfig,
                        patches: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the run's adapter in again with the columns and rows that align best with the loss's first gradient on
    ``patches`` (:mod:`tcurlora.tuners.gradient_selection`); its started new head is kept."""
    from ..tuners.gradient_selection import gradient_layout
    from .loss import DiceCEOnAnnotated

    tuner = get_tuner(network)
    record = tuner.record("finetune")
    if not patches:
        raise TCURLoRAError("selection 'gradient' needs training patches")
    stacks = gradient_layout(network, record, patches, DiceCEOnAnnotated())
    head = record.new_head()
    head_state = {k: v.detach().clone() for k, v in head.state_dict().items()} if head is not None else None
    tuner.delete_adapter("finetune")
    tuner.add_adapter(config, "finetune", layout={"stacks": stacks, "trained_modules": None})
    if head_state is not None:
        tuner.record("finetune").new_head().load_state_dict(head_state)


def _start_new_head(network: torch.nn.Module, base: BaseModel, table: List[dict],
                    patches: Optional["_Patches"] = None) -> None:
    """A fresh adapter's new head (labels that differ from the base's): each label starts from the base's
    channel of the same name, a label new to the base from its background at a low prior
    (:func:`~tcurlora.tuners.heads.start_new_head`), then, given the run's training ``patches`` (the
    ``prototype`` head start), at its prototype in the base's last-decoder features
    (:mod:`tcurlora.tuners.head_start`)."""
    head = get_tuner(network).record("finetune").new_head()
    if head is None:
        return
    base_head = unwrap(find(network, str(base.head)))
    channels = base_head.weight.shape[output_dim(base_head)]
    known = {str(entry["name"]).casefold(): i for i, entry in enumerate(base.labels, start=1) if i < channels}
    sources = [0] + [known.get(str(entry["name"]).casefold()) for entry in table]
    start_new_head(head, base_head, sources)
    new = [i for i, source in enumerate(sources) if source is None]
    if new and patches is not None and patches():
        start_at_prototypes(network, head, new, patches(), ignore_index=IGNORE_INDEX)


def _prototype_patches(cases: Sequence[Case], prep: Preprocessing, table: List[dict],
                       seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Patches the new head's prototypes are measured on: drawn as training draws them, without augmentation,
    from a stream of their own (the training steps' randomness is untouched)."""
    from ..preprocess import train_transforms

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
    # preset "decoder": only the conv stacks of the base's decoder modules, so backward stops at the decoder (on
    # deepbet at 128³ a CPU step then costs half of full fine-tuning, against about as much for every conv stack;
    # but on the demo's task it levelled off at Dice 0.954 where every stack reached 0.965, so "auto" keeps every
    # stack and the decoder is the user's choice for speed); the tuner takes the modules the base declared
    if options.preset == "decoder" and not base.decoder_modules:
        raise TCURLoRAError(f"base {base.name} declares no decoder modules: use --preset conv (or auto)")
    core = {key: getattr(options, key) for key in ("basis", "rank_stable", "selection", "norm_scale_shift", "rank_budget")}
    if options.method == "tcurlora" and options.new_label_recipe and new_labels(base, labels):
        core.update(new_label_recipe(base, options, labels))
    return TCURLoRAConfig(method=options.method, preset=options.preset, rank=options.rank, seed=options.seed, **core,
                          train_modules=train_modules if options.method != "full" else [], new_head=new_head)


def new_labels(base: BaseModel, labels: List[dict]) -> List[dict]:
    """The labels of ``labels`` the base does not have (by name, any case): structures it never drew."""
    known = {str(entry["name"]).casefold() for entry in base.labels}
    return [entry for entry in labels if str(entry["name"]).casefold() not in known]


def new_label_recipe(base: BaseModel, options: FinetuneOptions, labels: List[dict]) -> dict:
    """The new-structure recipe (:data:`tcurlora.protocol.NEW_LABEL_RECIPE`, and the rank budget of
    :func:`new_label_rank_budget`) in each option ``options`` left at its default; the norms' scale and shift and
    the budget only where the base declares its decoder (both place values there)."""
    recipe = dict(protocol.NEW_LABEL_RECIPE)
    if base.decoder_modules:
        recipe["rank_budget"] = new_label_rank_budget(base, options, labels)
    else:
        recipe.pop("norm_scale_shift", None)
    return {key: value for key, value in recipe.items() if getattr(options, key) == protocol.default(key)}


def new_label_rank_budget(base: BaseModel, options: FinetuneOptions, labels: List[dict]) -> Optional[int]:
    """The recipe's core budget: 1/:data:`~tcurlora.protocol.NEW_LABEL_VALUE_SHARE` of the values PEFT's LoRA of
    rank ``options.rank`` trains on the same layers (its convolutions and linear layers, not the transposed ones),
    less the new head's and the decoder norms' values, rounded down to a hundred; None when that is no more than
    the cores hold at that rank anyway."""
    from ..tuners.layers import norm_channels
    from ..tuners.stacks import decoder_norm_names, member_matrix, resolve_stacks

    network, rank = base.network, options.rank
    config = TCURLoRAConfig(rank=rank, preset=options.preset, train_modules=list(options.train_modules),
                            new_head={"module": base.head, "out_channels": len(labels) + 1})
    specs = resolve_stacks(network, config)
    lora = sum(rank * sum(member_matrix(network, m).shape) for spec in specs for m in spec.members
               if not isinstance(find(network, m.module), torch.nn.modules.conv._ConvTransposeNd))
    head = unwrap(find(network, str(base.head)))
    head_values = (head.weight.numel() // head.weight.shape[output_dim(head)] + (head.bias is not None)) * (len(labels) + 1)
    norms = sum(2 * norm_channels(find(network, n)) for n in decoder_norm_names(network, base.decoder_modules, []))
    budget = (lora // protocol.NEW_LABEL_VALUE_SHARE - head_values - norms) // 100 * 100
    cores = sum(len(s.members) * min(rank, *member_matrix(network, s.members[0]).shape) ** 2 for s in specs)
    return budget if budget > cores else None


def training_preprocessing(base: BaseModel, options: FinetuneOptions):
    """The base's preprocessing with the run's patch size (checked against what the base can take)."""
    prep = dataclasses.replace(base.preprocessing)
    if options.patch_size:
        patch = protocol.check_patch_size(options.patch_size, int(prep.divisible_by))
        prep = type(prep).from_dict({**prep.to_dict(), "patch_size": list(patch)})
    return prep


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _read_start(path: str, base: BaseModel, table: List[dict]):
    """The config of the adapter a run continues; refused in one line unless it was trained on this base with
    these labels (its tensors are loaded, with every check of ``load_adapter``, when training starts)."""
    from ..manifest import read_manifest

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
