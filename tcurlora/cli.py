"""The ``tcurlora`` command line: finetune, segment, export, evaluate, inspect, aggregate, federated, models,
fetch-model, demo.

One parser function and one handler per subcommand (:data:`COMMAND_HANDLERS`). The flags of job settings
come from :mod:`tcurlora.protocol` (names, defaults, checks), so the CLI, job files and Slicer agree.
Every user-facing error is one line (``error: <file or setting>: <problem>``) with exit status 2, before any
training starts; a cancelled run exits 3 after writing a resumable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__, protocol
from .errors import TCURLoRAError
from .protocol import EXIT_CANCELLED, EXIT_ERROR, SETTINGS_BY_KEY


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (and the same exit status)."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"error: {message.replace('argument ', '', 1)} (see {self.prog} --help)\n")


def _setting_help(key: str) -> str:
    """A protocol setting's help as argparse wants it: argparse %-formats help, the protocol writes prose."""
    return SETTINGS_BY_KEY[key].help.replace("%", "%%")


def _add_setting(p: argparse.ArgumentParser, key: str, **overrides) -> None:
    """The CLI flag of a job key: name, type, choices, help and default all from :mod:`tcurlora.protocol`.
    The flag's default stays None so that the job gets the protocol's default (and its check)."""
    s = SETTINGS_BY_KEY[key]
    kwargs = {"dest": key, "default": None, "help": _setting_help(key), "metavar": s.metavar, "nargs": s.nargs,
              "type": s.cli_type, "choices": getattr(s.check, "options", None)}
    kwargs.update(overrides)
    p.add_argument(s.flag, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def _add_switch(p: argparse.ArgumentParser, flag: str, key: str, value: bool = True, help: str = None) -> None:
    """An on/off flag for a boolean job key (store ``value`` when given)."""
    p.add_argument(flag, dest=key, action="store_const", const=value, default=None,
                   help=help or _setting_help(key))


def _base_args(p: argparse.ArgumentParser, stop_file: bool = True, series: bool = True) -> None:
    """The base-model and job flags; ``stop_file``/``series`` only where the command honours them."""
    for key in ("base", "weights", "fold", "device", "events") + (("stop_file",) if stop_file else ()):
        _add_setting(p, key)
    if series:
        p.add_argument("--series", metavar="UID", help="the DICOM series to read from input folders holding several")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tcurlora",
        description="Adapt a pretrained 3D segmentation network to your site from a few annotated cases with "
                    "tCURLoRA, and apply or share the tiny adapter file.",
        epilog="Start with `tcurlora demo`. Each command has its own --help.")
    parser.add_argument("--version", action="version", version=f"tcurlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_finetune_parser, _segment_parser, _export_parser, _evaluate_parser, _inspect_parser,
                _aggregate_parser, _federated_parser, _models_parser, _fetch_model_parser, _demo_parser):
        add(sub)
    return parser


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="train an adapter from (image, label) cases",
                       description="Train a tCURLoRA adapter (or a baseline) on annotated cases and write it as "
                                   "one .safetensors file, with a training-curve PNG and a resumable checkpoint "
                                   "beside it (NAME.safetensors -> NAME.curve.png, NAME.checkpoint.pt).",
                       epilog="example: tcurlora finetune --image t1.nii.gz --label brain.seg.nrrd "
                              "--out site.safetensors")
    _base_args(p)
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="a training image (repeat with --label)")
    p.add_argument("--label", action="append", default=[], metavar="FILE",
                   help="its label map or Slicer .seg.nrrd (segments are matched to labels by name)")
    p.add_argument("--cases", metavar="FOLDER", help="a folder of cases (imagesTr/labelsTr, or X + X_label side by side)")
    p.add_argument("--val-image", action="append", default=[], metavar="FILE", help="a validation image")
    p.add_argument("--val-label", action="append", default=[], metavar="FILE", help="its label")
    for key in ("labels", "out", "start_from", "method", "rank", "preset", "basis", "selection", "rank_budget",
                "head_start", "train_modules", "steps", "lr", "weight_decay", "batch_size", "patch_size", "val_every",
                "patience", "grad_accum", "checkpoint_every", "seed"):
        _add_setting(p, key)
    _add_switch(p, "--rank-stable", "rank_stable")
    _add_switch(p, "--norm-scale-shift", "norm_scale_shift")
    _add_switch(p, "--no-new-label-recipe", "new_label_recipe", False,
                help="a label the base lacks: train with exactly the options given, not the new-structure recipe")
    _add_switch(p, "--checkpointing", "checkpointing")
    _add_switch(p, "--no-bf16", "bf16", False, help="no bf16 autocast on CUDA")
    _add_switch(p, "--resume", "resume")
    p.add_argument("--job", metavar="JOB.json", help="read all settings from a job file (the Slicer worker format)")


def _segment_parser(sub) -> None:
    p = sub.add_parser("segment", help="segment volumes with a base model and optionally an adapter",
                       description="Segment one volume, several, or a folder. The adapter is merged into the "
                                   "weights first, so it costs nothing at inference. Output: .seg.nrrd with segment "
                                   "names and colours (opens in 3D Slicer), or a label map for .nii.gz/.nrrd/.mha.",
                       epilog="example: tcurlora segment --adapter site.safetensors t1.nii.gz -o t1_brain.seg.nrrd")
    _base_args(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, DICOM folders or folders of images")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="output file (one input) or folder (several)")
    _add_setting(p, "adapter")
    _add_switch(p, "--tta", "tta", help="average over mirrored inputs (default: the base's own choice: nnU-Net "
                "mirrors when its trainer allows, as nnUNetv2_predict does; the other bases do not)")
    _add_switch(p, "--no-tta", "tta", False, help="no mirrored inputs (nnUNetv2_predict's --disable_tta)")
    _add_switch(p, "--largest-component", "largest_component",
                help="keep only the largest connected component per label (default: the base's choice, for the "
                     "labels the base itself has; an adapter's new labels keep every component)")
    _add_switch(p, "--all-components", "largest_component", False, help="keep every component")
    _add_switch(p, "--probabilities", "probabilities")
    _add_setting(p, "sw_batch_size")
    _add_setting(p, "overlap")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="merge an adapter into its base and write the base's own format",
                       description="The base with the adapter merged into its weights, for the base's own tools "
                                   "(nnU-Net, MONAI bundle, SlicerMONAIAuto3DSeg); see docs/export.md.",
                       epilog="example: tcurlora export --base Dataset901_X/nnUNetTrainer__nnUNetPlans__3d_fullres "
                              "--fold 0 --adapter site.safetensors -o exports")
    _base_args(p, stop_file=False, series=False)
    _add_setting(p, "adapter", required=True)
    p.add_argument("-o", "--output", required=True, metavar="FOLDER",
                   help="where the export goes (made if missing); it is written as FOLDER/<base>_<adapter>")
    _add_setting(p, "format")


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice and HD95 of predictions against references",
                       description="Dice and HD95 (95th percentile of surface distances, in mm) per label and case.",
                       epilog="example: tcurlora evaluate pred.seg.nrrd ref.nii.gz --json")
    p.add_argument("pred", help="prediction (file or folder)")
    p.add_argument("ref", help="reference (file or folder with the same file names)")
    p.add_argument("--json", action="store_true", help="print JSON to standard output instead of CSV")
    p.add_argument("--csv", metavar="FILE", help="write the CSV here (default: standard output)")


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show what an adapter file holds",
                       description="Read an adapter's manifest (never its code: there is none) and summarise it.")
    p.add_argument("adapter", metavar="ADAPTER.safetensors")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")


def _aggregate_parser(sub) -> None:
    p = sub.add_parser("aggregate", help="average adapters trained at several sites into one (exact for tCURLoRA)",
                       description="Weighted average of adapters trained on the same base with the same layout: "
                                   "for tCURLoRA the mean of the cores is exactly the mean of the weight updates. "
                                   "Refuses adapters of other bases, stacks, ranks, indices or labels, and LoRA "
                                   "(whose factors do not average).",
                       epilog="example: tcurlora aggregate siteA.safetensors siteB.safetensors -o merged.safetensors")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER.safetensors")
    p.add_argument("--weights", type=float, nargs="+", metavar="N",
                   help="one weight per adapter (default: each adapter's number of training cases)")
    p.add_argument("-o", "--output", required=True, metavar="MERGED.safetensors")


#: the job settings `tcurlora federated server` takes as flags (its steps per round are --local-steps)
FEDERATED_SERVER_SETTINGS = ("method", "rank", "preset", "train_modules", "labels", "lr", "batch_size", "patch_size",
                             "seed")


def _federated_parser(sub) -> None:
    from .federated.checks import DEFAULT_MAX_SITE_CASES

    p = sub.add_parser("federated", help="federated fine-tuning across sites on Flower (only adapter cores travel)",
                       description="One server and several sites train one adapter without moving a scan: each "
                                   "round the sites run K steps of finetune on their own cases from the global "
                                   "adapter and the server averages their cores (exact for tCURLoRA). Runs on "
                                   "Flower's deployment engine: the server starts a SuperLink and submits the "
                                   "federation's Flower App with `flwr run`, each site starts a SuperNode. TLS and "
                                   "site keys by default; sites run only this federation's app. Needs: pip install "
                                   "\"tcurlora[federated]\".")
    fed = p.add_subparsers(dest="federated_command", metavar="ROLE", required=True)
    f = fed.add_parser("server", help="run the rounds and average the sites' adapters",
                       epilog="example: tcurlora federated server --address 0.0.0.0:9092 --tls-dir certs "
                              "--site-keys keys/ --rounds 5 --local-steps 20 --min-clients 3 --out global.safetensors")
    _base_args(f, stop_file=False, series=False)  # stop a federation with Ctrl-C; the server reads no images
    f.add_argument("--address", default="127.0.0.1:9092", metavar="HOST:PORT",
                   help="where the sites connect: Flower's Fleet API alone, through the federation's gateway "
                        "(default 127.0.0.1:9092; 0.0.0.0:PORT for other machines)")
    f.add_argument("--rounds", type=int, default=3, help="federated rounds R (default 3)")
    f.add_argument("--local-steps", type=int, default=20, help="training steps K each site runs per round (default 20)")
    f.add_argument("--min-clients", type=int, default=2, help="sites that must join each round (default 2)")
    for key in FEDERATED_SERVER_SETTINGS:  # what every site trains: flags, defaults and checks from the protocol
        _add_setting(f, key, **({"help": "what the sites train: tcurlora (default), decoder or full (LoRA-type "
                                         "methods are refused: their factors do not average)"} if key == "method"
                                else {"metavar": "JSON", "help": "the adapter's label table (default: the base's)"}
                                if key == "labels" else {}))
    f.add_argument("--out", required=True, metavar="GLOBAL.safetensors",
                   help="the final global adapter (each round's is kept as GLOBAL.roundN.safetensors)")
    f.add_argument("--tls-dir", metavar="DIR", help="ca.crt, server.pem, server.key (see `tcurlora federated certs`; "
                   "the certificate must name the server's host and 127.0.0.1)")
    f.add_argument("--site-keys", nargs="+", default=[], metavar="SITE.pub",
                   help="the public keys of the sites admitted (files or folders of SITE.pub, made by `tcurlora "
                        "federated keys` at each site); the site's name is its file's name")
    f.add_argument("--max-site-cases", type=int, default=DEFAULT_MAX_SITE_CASES, metavar="N",
                   help=f"a site's reported case count weighs at most N (default {DEFAULT_MAX_SITE_CASES})")
    f.add_argument("--insecure", action="store_true", help="no TLS and no site keys (tests on one machine only)")
    f = fed.add_parser("client", help="train at this site in every round",
                       epilog="example: tcurlora federated client --server fl.example.org:9092 --root-cert ca.crt "
                              "--key hospital-a.key --cases my_cases/ --out site.safetensors")
    _base_args(f, stop_file=False)
    f.add_argument("--server", required=True, metavar="HOST:PORT",
                   help="the federation server (its SuperLink, which this site's Flower SuperNode connects to)")
    f.add_argument("--cases", metavar="FOLDER", help="this site's cases (imagesTr/labelsTr, or X + X_label side by side)")
    f.add_argument("--image", action="append", default=[], metavar="FILE")
    f.add_argument("--label", action="append", default=[], metavar="FILE")
    f.add_argument("--out", required=True, metavar="ADAPTER.safetensors",
                   help="the global adapter after the last round (this site's own round results: ADAPTER.roundN...)")
    f.add_argument("--root-cert", metavar="CA.crt", help="the federation's CA certificate (TLS)")
    f.add_argument("--key", metavar="SITE.key", help="this site's private key (`tcurlora federated keys`; its .pub "
                   "must be on the server's --site-keys)")
    f.add_argument("--insecure", action="store_true", help="no TLS and no site key (tests on one machine only)")
    f.add_argument("--site", default=None, help="this site's name when the server has no site keys (default: the "
                   "host name)")
    f.add_argument("--seed", type=int, default=0)
    f = fed.add_parser("certs", help="make a self-signed CA and server certificate (for trying it out)")
    f.add_argument("--out", required=True, metavar="DIR")
    f.add_argument("--host", action="append", default=[], metavar="NAME|IP",
                   help="the server's host name or IP address (repeat; 127.0.0.1 and localhost are always added: "
                        "Flower's SuperLink connects to itself over loopback)")
    f = fed.add_parser("keys", help="make this site's key pair (SITE.key stays here, SITE.pub goes to the server)")
    f.add_argument("--out", required=True, metavar="DIR")
    f.add_argument("--site", required=True, help="this site's name (the server lists the site under it)")


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="list the base-model catalog and what is cached",
                       description="List catalog base models, their labels and whether their weights are cached.")
    p.add_argument("--json", action="store_true")
    p.add_argument("--discover", action="store_true", help="list the models already on this machine (TotalSegmentator, "
                   "nnU-Net, SlicerNNUnet, SlicerMONAIAuto3DSeg, MONAI bundles), usable as --base")
    p.add_argument("--root", action="append", default=[], metavar="KIND=FOLDER",
                   help="with --discover: search only these folders (kind: totalsegmentator, nnunet, auto3dseg, bundle)")


def _fetch_model_parser(sub) -> None:
    p = sub.add_parser("fetch-model", help="download a catalog model into the cache (pinned, hash-checked)",
                       description="Fetch a catalog base model once into the cache (TCURLORA_CACHE overrides "
                                   "where). For air-gapped sites, pass the pinned file with --from.")
    p.add_argument("name", help="catalog name, e.g. deepbet")
    p.add_argument("--from", dest="local_file", metavar="FILE", help="use this local copy of the pinned archive")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole promise on real scans, in minutes on a CPU",
                       description="Fine-tune a tCURLoRA adapter for deepbet on a real head MRI annotated with a "
                                   "site's brain-mask convention, apply it to a held-out real scan, and compare "
                                   "the base model zero-shot with the adapted one.")
    p.add_argument("--out", default="demo-output", help="output folder (default ./demo-output)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 24)")
    p.add_argument("--compare", action="store_true", help="also train LoRA and decoder-only with the same budget")
    p.add_argument("--device", default=protocol.default("device"), choices=protocol.DEVICES)
    p.add_argument("--quick", action="store_true", help="a reduced run (fewer steps, lower resolution) for tests")


# ----------------------------------------------------------------------------------------------


def _pairs(images: List[str], labels: List[str], what: str):
    if len(images) != len(labels):
        raise TCURLoRAError(f"{len(images)} {what} image(s) but {len(labels)} label(s): give --image/--label in pairs")
    return list(zip(images, labels))


def _load_labels(value):
    if value in (None, "from-segmentation") or isinstance(value, list):
        return value
    from .safejson import read_json

    return read_json(value, "label table")


def _settings_from_args(args, command: str) -> dict:
    """The job keys given as flags (None = not given: the protocol's default applies)."""
    return {s.key: getattr(args, s.key) for s in protocol.settings_for(command)
            if getattr(args, s.key, None) is not None}


def cmd_finetune(args, events) -> int:
    from .worker import read_job, run_finetune

    if args.job:
        return run_finetune(read_job(args.job), events)
    train = _pairs(args.image, args.label, "training")
    if args.cases:
        from .io import find_cases

        train += find_cases(args.cases)
    job = {**_settings_from_args(args, "finetune"), "command": "finetune",
           "cases": [{"image": i, "label": l} for i, l in train],
           "validation": [{"image": i, "label": l} for i, l in _pairs(args.val_image, args.val_label, "validation")],
           "labels": _load_labels(args.labels)}
    return run_finetune(protocol.validate_job(job, style="cli"), events)


def cmd_segment(args, events) -> int:
    from .worker import run_segment

    job = {**_settings_from_args(args, "segment"), "command": "segment", "inputs": args.inputs,
           "output": args.output}
    return run_segment(protocol.validate_job(job, style="cli"), events)


def cmd_export(args, events) -> int:
    from .worker import run_export

    job = {**_settings_from_args(args, "export"), "command": "export", "output": args.output}
    return run_export(protocol.validate_job(job, style="cli"), events)


def cmd_evaluate(args) -> int:
    import csv
    import io as _io

    from .metrics import evaluate, summary_line

    pred, ref = Path(args.pred), Path(args.ref)
    if pred.is_dir():
        from .io import stem, volume_files

        # label maps AND Slicer .seg.nrrd (what `segment` writes by default); not expand_inputs, which
        # lists images to segment and so leaves .seg.nrrd files out
        preds = [str(p) for p in volume_files(pred)]
        if not preds:
            raise TCURLoRAError(f"{pred.name}: no label maps or segmentations in this folder")
        refs_by_stem = {stem(p): str(p) for p in volume_files(ref)} if ref.is_dir() else {}
        pairs = [(p, refs_by_stem.get(stem(p))) for p in preds]
        missing = [Path(p).name for p, r in pairs if r is None]
        if missing:
            raise TCURLoRAError(f"{ref.name}: no reference for {', '.join(missing[:5])}")
        preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    else:
        preds, refs = [str(pred)], [str(ref)]
    rows = evaluate(preds, refs)
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary_line(rows)}, indent=2,
                         default=lambda x: None))
        return 0
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["case", "label", "name", "dice", "hd95_mm"])
    writer.writeheader()
    writer.writerows(rows)
    if args.csv:
        from .atomic import atomic_write_text

        atomic_write_text(args.csv, buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
    print(summary_line(rows), file=sys.stderr if not args.csv else sys.stdout)
    return 0


def cmd_inspect(args) -> int:
    import os

    from .manifest import read_manifest, summary

    manifest = read_manifest(args.adapter)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(f"{Path(args.adapter).name} ({os.path.getsize(args.adapter) / 1024:.1f} KB)")
        print(summary(manifest))
    return 0


def cmd_models(args) -> int:
    from .catalog import list_models

    if args.discover:
        from .models.discover import discover_main

        return discover_main(args.root, args.json)

    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    for m in models:
        labels = ", ".join(l["name"] for l in m["labels"])
        print(f"{m['name']:10s} {'cached    ' if m['cached'] else 'not cached'}  {m['title']}")
        print(f"{'':10s} labels: {labels}; licence: {m.get('licence')}; source: {m.get('source')}")
    return 0


def cmd_fetch_model(args) -> int:
    from .catalog import get_entry
    from .models import load_base

    from .events import Events
    from .fetch import download_progress

    get_entry(args.name)
    with download_progress(Events(None, sys.stderr).download):
        base = load_base(args.name, local_file=args.local_file)
    print(f"{args.name}: ready ({sum(p.numel() for p in base.network.parameters()):,} parameters)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_aggregate(args) -> int:
    from .aggregate import aggregate

    done = aggregate(args.adapters, args.output, args.weights)
    share = ", ".join(f"{Path(a).name} x{w:g}" for a, w in zip(args.adapters, done["weights"]))
    print(f"{Path(args.output).name}: weighted mean of {share}")
    return 0


def cmd_federated(args, events) -> int:
    if args.federated_command == "certs":
        from .federated.tls import generate_certificates

        folder = generate_certificates(args.out, args.host or ["127.0.0.1", "localhost"])
        print(f"{folder}: ca.crt (give to every site), server.pem and server.key (keep on the server)")
        return 0
    if args.federated_command == "keys":
        from .federated.keys import generate_site_key

        private, public = generate_site_key(args.out, args.site)
        print(f"{private}: this site's key (keep it here, pass it as --key); {public.name}: give it to the server "
              "operator (--site-keys)")
        return 0
    device = args.device or protocol.default("device")
    base = args.base or protocol.default("base")
    if args.federated_command == "server":
        from .federated.server import run_server
        from .models import load_base
        from .train import FinetuneOptions

        given = {k: getattr(args, k) for k in FEDERATED_SERVER_SETTINGS if getattr(args, k) is not None}
        given.update(labels=_load_labels(args.labels), steps=args.local_steps, device=device)
        # checked once, here, and completed with the defaults: what every site will train
        checked = protocol.validate_settings(given, (*protocol.FINETUNE_OPTION_KEYS, "labels"), style="cli")
        labels = checked.pop("labels")
        options = FinetuneOptions.from_job(checked)
        result = run_server(load_base(base, weights=args.weights, fold=args.fold), options,
                            labels=labels, address=args.address, rounds=args.rounds,
                            min_clients=args.min_clients, out=args.out, tls_dir=args.tls_dir, insecure=args.insecure,
                            site_keys=args.site_keys, max_site_cases=args.max_site_cases, events=events,
                            events_file=args.events)
    else:
        import socket

        from .federated.client import run_client

        pairs = _pairs(args.image, args.label, "training")
        if args.cases:
            from .io import find_cases

            pairs += find_cases(args.cases)
        result = run_client(pairs, base=base, weights=args.weights, fold=args.fold, server=args.server, out=args.out,
                            key=args.key, root_cert=args.root_cert, insecure=args.insecure, seed=args.seed,
                            device=device,
                            site=args.site or socket.gethostname(), events=events, events_file=args.events)
    events.result(result["outputs"], result["metrics"])
    return 0


#: One handler per subcommand; the ones that take ``events`` are those that run a job.
COMMAND_HANDLERS = {
    "finetune": cmd_finetune,
    "segment": cmd_segment,
    "export": cmd_export,
    "evaluate": lambda args, events: cmd_evaluate(args),
    "inspect": lambda args, events: cmd_inspect(args),
    "aggregate": lambda args, events: cmd_aggregate(args),
    "federated": cmd_federated,
    "models": lambda args, events: cmd_models(args),
    "fetch-model": lambda args, events: cmd_fetch_model(args),
    "demo": lambda args, events: cmd_demo(args),
}
JOB_COMMANDS = ("finetune", "segment", "export", "federated")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_ERROR
    from .distributed import is_main_process
    from .events import Events

    try:
        events = Events.for_cli(getattr(args, "events", None)) if args.command in JOB_COMMANDS else None
        if events is not None and not is_main_process():  # a torchrun rank other than 0: rank 0 reports
            events.close()
            events = Events()
    except OSError as exc:  # e.g. --events in a folder that does not exist: one line, no traceback
        print(f"error: {Path(args.events).name}: cannot write the events file ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_ERROR
    try:
        if getattr(args, "series", None):  # a DICOM folder input stands for one file of the chosen series
            from .io import pick_dicom_series

            for field in ("image", "val_image", "inputs"):
                if hasattr(args, field):
                    setattr(args, field, [pick_dicom_series(p, args.series) for p in getattr(args, field)])
        return COMMAND_HANDLERS[args.command](args, events)
    except TCURLoRAError as exc:
        if events is not None and events.stream is not None:
            events.error(str(exc))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        if events is not None:
            events.close()


if __name__ == "__main__":
    sys.exit(main())
