"""A small model in SlicerMONAIAuto3DSeg's format, made offline with MONAI alone, and that extension's
inference script rebuilt from the same MONAI transforms (the reference the engine must match).

The model is a SegResNetDS (deep supervision, instance norm written as Auto3DSeg writes it) trained for a
few AdamW steps on the vendored TPTBox CT crop (L2, L3, L4), the way Auto3DSeg's trainer trains:
deep-supervision Dice+CE on ``roi_size`` crops of the preprocessed image.  It is a tiny test model, not a
useful segmenter.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

CONFIG = {
    "network": {"_target_": "SegResNetDS", "init_filters": 8, "blocks_down": [1, 1, 1], "norm": "INSTANCE_NVFUSER",
                "in_channels": 1, "out_channels": 4, "dsdepth": 2},
    "normalize_mode": "range",
    "intensity_bounds": [-300.0, 1200.0],
    "roi_size": [32, 32, 32],
    "orientation_ras": True,
    "crop_foreground": True,
    # 1.5 mm input: the first and last axes are within 0.75-1.25x and left alone, the middle one resampled
    "resample_resolution": [1.6, 2.5, 1.6],
    "sigmoid": False,
    "extra_modalities": {},
    "bundle_root": "segresnet_0",
}

# L2, L3, L4 with their SNOMED CT codes, as the extension's labels.csv lists them
LABELS = [(1, "L2 vertebra", "14293000", "Second lumbar vertebra"),
          (2, "L3 vertebra", "36470004", "Third lumbar vertebra"),
          (3, "L4 vertebra", "11994002", "Fourth lumbar vertebra")]
CSV_FIELDS = ["SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence",
              "SegmentedPropertyTypeModifierCodeSequence", "AnatomicRegionSequence", "AnatomicRegionModifierSequence"]


def write_labels_csv(path: Path) -> None:
    header = ["LabelValue", "Name"] + [f"{f}.{p}" for f in CSV_FIELDS
                                       for p in ("CodingSchemeDesignator", "CodeValue", "CodeMeaning")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for value, name, code, meaning in LABELS:
            w.writerow([value, name, "SCT", "123037004", "Anatomical Structure", "SCT", code, meaning] + [""] * 9)


def make_model(folder: Path, image: Path, label: Path, steps: int = 6, seed: int = 0) -> Path:
    """Train and write ``folder/model.pt`` + ``folder/labels.csv``; returns ``folder``."""
    from monai.bundle import ConfigParser
    from monai.losses import DeepSupervisionLoss, DiceCELoss
    from monai.transforms import (Compose, EnsureTyped, Lambdad, LoadImaged, MapLabelValued, Orientationd,
                                  RandCropByPosNegLabeld, ScaleIntensityRanged, Spacingd)

    torch.manual_seed(seed)
    net = ConfigParser(CONFIG["network"]).get_parsed_content()  # the extension builds it the same way
    lo, hi = CONFIG["intensity_bounds"]
    prep = Compose([
        LoadImaged(keys=["image", "label"], ensure_channel_first=True),
        EnsureTyped(keys=["image", "label"], dtype=torch.float, track_meta=True),
        MapLabelValued(keys="label", orig_labels=[21, 22, 23], target_labels=[1, 2, 3]),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        Spacingd(keys=["image", "label"], pixdim=CONFIG["resample_resolution"], mode=["bilinear", "nearest"]),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=-1, b_max=1, clip=False),
        Lambdad(keys="image", func=torch.sigmoid),
    ])
    case = prep({"image": str(image), "label": str(label)})
    crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=CONFIG["roi_size"],
                                  pos=2, neg=1, num_samples=2)
    crop.set_random_state(seed)
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-5)
    net.train()
    for _ in range(steps):
        patches = crop(case)
        x = torch.stack([p["image"].as_tensor() for p in patches])
        y = torch.stack([p["label"].as_tensor() for p in patches])
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "config": CONFIG, "epoch": steps, "best_metric": 0.0},
               folder / "model.pt")
    write_labels_csv(folder / "labels.csv")
    return folder


def extension_inference(model_file: Path, image_file: Path) -> np.ndarray:
    """SlicerMONAIAuto3DSeg's ``auto3dseg_segresnet_inference.py`` for one input image, step by step with the
    same MONAI transforms and settings; returns the label array in the input's (i, j, k) voxel order."""
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch, list_data_collate
    from monai.inferers import SlidingWindowInfererAdapt
    from monai.transforms import (Compose, ConcatItemsd, CropForegroundd, EnsureTyped, Invertd, Lambdad,
                                  LoadImaged, NormalizeIntensityd, Orientationd, ScaleIntensityRanged, Spacingd)
    from monai.utils import convert_to_dst_type

    checkpoint = torch.load(model_file, map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    model = ConfigParser(config["network"]).get_parsed_content()
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    model = model.to(memory_format=torch.channels_last_3d).eval()

    images = LoadImaged(keys=["image1"], ensure_channel_first=True, dtype=None, allow_missing_keys=True,
                        image_only=False)({"image1": str(image_file)})
    ts = [ConcatItemsd(keys=["image1"], name="image", dim=0),
          EnsureTyped(keys="image", data_type="tensor", dtype=torch.float, allow_missing_keys=True)]
    mode, bounds = config["normalize_mode"], config["intensity_bounds"]
    if mode in ("range", "ct"):
        ts += [ScaleIntensityRanged(keys="image", a_min=bounds[0], a_max=bounds[1], b_min=-1, b_max=1, clip=False),
               Lambdad(keys="image", func=lambda x: torch.sigmoid(x))]
    elif mode in ("meanstd", "mri"):
        ts.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    elif mode == "meanstdtanh":
        ts += [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
               Lambdad(keys="image", func=lambda x: 3 * torch.tanh(x / 3))]
    elif mode == "pet":
        ts.append(Lambdad(keys="image", func=lambda x: torch.sigmoid((x - x.min()) / x.std())))
    if config.get("orientation_ras", False):
        ts.append(Orientationd(keys="image", axcodes="RAS"))
    if config.get("crop_foreground", True):
        ts.append(CropForegroundd(keys="image", source_key="image1", margin=10, allow_smaller=True))
    if config.get("resample_resolution", None) is not None:
        pixdim = list(config["resample_resolution"])
        ts.append(Spacingd(keys=["image"], pixdim=list(pixdim), mode=["bilinear"], dtype=torch.float,
                           min_pixdim=np.array(pixdim) * 0.75, max_pixdim=np.array(pixdim) * 1.25,
                           allow_missing_keys=True))
    inf_transform = Compose(ts)
    sliding_inferrer = SlidingWindowInfererAdapt(roi_size=config["roi_size"], sw_batch_size=1, overlap=0.625,
                                                 mode="gaussian", cache_roi_weight_map=False, progress=False)
    batch_data = inf_transform([images])
    batch_data = list_data_collate([batch_data])
    data = batch_data["image"].as_subclass(torch.Tensor).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        logits = sliding_inferrer(inputs=data, network=model)
    pred = torch.argmax(torch.softmax(logits, dim=1), dim=1, keepdim=True).to(dtype=torch.uint8)
    post_transforms = Compose([Invertd(keys="pred", orig_keys="image", transform=inf_transform, nearest_interp=True)])
    batch_data["pred"] = convert_to_dst_type(pred, batch_data["image"], dtype=pred.dtype, device=pred.device)[0]
    seg = [post_transforms(x)["pred"] for x in decollate_batch(batch_data)][0][0]
    return seg.cpu().numpy().astype(np.uint8)


if __name__ == "__main__":  # python Testing/auto3dseg_model.py OUT: the test model, ct.nrrd and ct_label.nrrd in OUT
    import sys

    import SimpleITK as sitk

    data = Path(__file__).resolve().parent / "Data" / "tptbox"
    out = Path(sys.argv[1])
    make_model(out / "model", data / "sub-ct_label-22_ct.nii.gz", data / "sub-ct_seg-vert_label-22_msk.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(data / "sub-ct_label-22_ct.nii.gz")), str(out / "ct.nrrd"))
    vert = sitk.ReadImage(str(data / "sub-ct_seg-vert_label-22_msk.nii.gz"))
    label = sitk.GetImageFromArray(np.select([sitk.GetArrayFromImage(vert) == v for v in (21, 22, 23)], [1, 2, 3], 0)
                                   .astype(np.uint8))
    label.CopyInformation(vert)
    sitk.WriteImage(label, str(out / "ct_label.nrrd"))
    print(f"{out / 'model'}: Auto3DSeg-format test model; {out / 'ct.nrrd'}, {out / 'ct_label.nrrd'}: a case")
