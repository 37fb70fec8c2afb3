"""CPU time of a training step and of a segmentation on an nnU-Net v2 base (the tiny test model by default).

Not a test: it prints what it measured.

    OMP_NUM_THREADS=1 python benchmarks/bench_nnunet.py     # builds the test model (Testing/nnunet_fixture.py)
    python benchmarks/bench_nnunet.py --model FOLDER --fold 0 --image CT.nii.gz --label LABEL.nii.gz

A training step is one ``finetune`` step (tCURLoRA rank 8, batch 2 patches of the plans' patch size, forward +
backward + AdamW), taken as the difference of a 2-step and a (2 + steps)-step run; a segmentation is
``tcurlora segment`` on one volume (nnU-Net's preprocessing, sliding window at step 0.5, export), without and
with mirroring. Both use the threads torch is given (OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an nnU-Net trained-model folder (default: build the test model)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--image", help="training image and the volume segmented (default: the test model's case 0)")
    parser.add_argument("--label", help="its label map")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="segmentations per mode (the median is printed)")
    args = parser.parse_args()

    import torch

    from tcurlora.infer import segment
    from tcurlora.models import load_base
    from tcurlora.train import FinetuneOptions, finetune

    work = Path(tempfile.mkdtemp(prefix="bench-nnunet-"))
    model = args.model
    if model is None:
        import nnunet_fixture

        model = nnunet_fixture.build(work / "nnunet")
        raw = work / "nnunet" / "nnUNet_raw" / nnunet_fixture.DATASET
        args.image = args.image or str(raw / "imagesTr" / "tptbox_000_0000.nii.gz")
        args.label = args.label or str(raw / "labelsTr" / "tptbox_000.nii.gz")
    base = load_base(model, fold=args.fold)
    n_params = sum(p.numel() for p in base.network.parameters())
    print(f"model {base.name}: {n_params:,} parameters, patch {list(base.preprocessing.patch_size)}, "
          f"{torch.get_num_threads()} thread(s)")

    # two runs, 2 and 2 + steps long: the difference is the steps alone (no reading, no start-up, no saving)
    runs = {}
    for n in (2, 2 + args.steps):
        base = load_base(model, fold=args.fold)
        cpu0 = time.process_time()
        result = finetune(base, [(args.image, args.label)], work / f"adapter{n}.safetensors",
                          options=FinetuneOptions(steps=n, device="cpu", patience=0))
        runs[n] = (time.process_time() - cpu0, result.metrics.seconds)
    cpu = (runs[2 + args.steps][0] - runs[2][0]) / args.steps
    wall = (runs[2 + args.steps][1] - runs[2][1]) / args.steps
    print(f"training step: {cpu:.2f} s CPU, {wall:.2f} s wall (mean of {args.steps} steps)")

    for tta in (False, True):
        walls, cpus = [], []
        for _ in range(args.repeats):
            base = load_base(model, fold=args.fold)
            cpu0, t0 = time.process_time(), time.perf_counter()
            segment(base, [args.image], str(work / "seg.nii.gz"), device="cpu", tta=tta)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - cpu0)
        print(f"segmentation ({'mirroring' if tta else 'no mirroring'}): {statistics.median(walls):.2f} s wall, "
              f"{statistics.median(cpus):.2f} s CPU (median of {args.repeats})")


if __name__ == "__main__":
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    main()
