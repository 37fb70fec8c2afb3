"""The speed table of docs/benchmarks.md's summary, regenerated from the benchmark output (``resources*.json``,
``cpu_default.json``).

    python benchmarks/readme_table.py                # rewrite the block between the markers in docs/benchmarks.md
    python benchmarks/readme_table.py --print        # only print it

The block lies between ``<!-- speed-table:begin -->`` and ``<!-- speed-table:end -->``; everything else in the
page is left as it is.  ``benchmarks/run_all.py`` calls this at its end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from resources import BACKWARD_FLOOR, step_ratio  # noqa: E402
RESULTS = ROOT / "docs" / "benchmarks-results"
BEGIN, END = "<!-- speed-table:begin -->", "<!-- speed-table:end -->"
SUMMARY_PAGE = ROOT / "docs" / "benchmarks.md"
SOURCES = ("resources_conv.json", "resources.json")  # the first file that has a model wins for it
TITLES = {"deepbet128": "deepbet (LinkNet) 128³, batch 1", "nnunet": "nnU-Net PlainConvUNet 80×48×80, batch 2",
          "unetr-small": "UNETR (ViT 192) 48³, batch 1", "vitb": "UNETR ViT-B 96³, batch 2"}


def _rows(results: Path):
    seen = {}
    for name in SOURCES:
        path = results / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        infer = {i["model"]: i for i in data.get("infer", [])}
        by_model = {}
        for row in data["train"]:
            by_model.setdefault(row["model"], {})[row["method"]] = row
        for model, methods in by_model.items():
            if model not in seen:
                seen[model] = (methods, infer.get(model), data.get("machine", ""), data.get("date"))
    return seen


def _ratio(a, b, key):
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return "–"
    return f"{step_ratio(a, b) if key == 'train_step_s' else a[key] / b[key]:.2f}"


def speed_table(results: Path = RESULTS) -> str:
    """Markdown: per base, tCURLoRA's train step and peak memory against full fine-tuning and PEFT LoRA."""
    lines = ["| base (CPU) | tCURLoRA layers | step / full fine-tuning | step / PEFT LoRA | peak RSS / full | "
             "peak RSS / LoRA | merged inference / base |", "|---|---|---|---|---|---|---|"]
    machines, dates = set(), []
    for model, (methods, infer, machine, date) in _rows(results).items():
        full, lora = methods.get("full fine-tuning"), methods.get("LoRA r=8 (PEFT)")
        merged = f"{infer['merged_over_base']:.2f}" if infer else "–"
        for label in ("tCURLoRA r=8", "tCURLoRA r=8 decoder-side", "tCURLoRA r=8 + decoder", BACKWARD_FLOOR):
            ours = methods.get(label)
            if ours is None:
                continue
            vit = model in ("unetr-small", "vitb")
            layers = {"tCURLoRA r=8 decoder-side": "decoder convs (`--preset decoder`)",
                      "tCURLoRA r=8": "ViT stacks (default)" if vit else "every conv stack (default)",
                      "tCURLoRA r=8 + decoder": "ViT stacks + decoder",
                      BACKWARD_FLOOR: "none: backward to the first conv only (the floor of every stack)"}[label]
            lines.append(f"| {TITLES.get(model, model)} | {layers} | {_ratio(ours, full, 'train_step_s')} | "
                         f"{_ratio(ours, lora, 'train_step_s')} | {_ratio(ours, full, 'peak_rss_mb')} | "
                         f"{_ratio(ours, lora, 'peak_rss_mb')} | {merged} |")
            merged = ""  # once per base
        machines.add(machine.split(", load average")[0])
        dates.append(date or "(date not recorded)")
    default = results / "cpu_default.json"
    lines.append("")
    lines.append(f"Measured {', '.join(sorted(set(dates)))} on {'; '.join(sorted(m for m in machines if m))}: every "
                 "method in a fresh process, interleaved rounds; a step ratio is the median of the per-round ratios of median "
                 "steps where the rounds were recorded, else the ratio of the medians (`benchmarks/resources.py`).")
    if default.is_file():
        data = json.loads(default.read_text(encoding="utf-8"))
        rows = {r["variant"].split(" (")[0].split(":")[0]: r for r in data["rows"]}
        if "default" in rows and "reference" in rows:
            d, r = rows["default"], rows["reference"]
            lines.append(f"Default `tcurlora finetune` on the demo's heads ({data['machine']['cpus']} CPUs, "
                         f"{data['machine']['date']}): {d['steps']} steps in {d['train_wall_s'] / 60:.1f} min of wall "
                         f"time, Dice {d['dice']:.4f} on the held-out head, against {r['dice']:.4f} after {r['steps']} "
                         f"full-resolution steps (`benchmarks/cpu_default.py`).")
    return "\n".join(lines)


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme.name}: no {BEGIN} … {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")
    tmp.replace(readme)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=SUMMARY_PAGE)
    parser.add_argument("--print", action="store_true", help="print the table, change nothing")
    args = parser.parse_args(argv)
    table = speed_table(args.results)
    if args.print:
        print(table)
    else:
        update_readme(args.readme, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
