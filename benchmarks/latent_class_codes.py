"""Where a trained single-step latent model puts each class in the mask latent, and where its one-step prediction
lands (the diagnosis of the ischemic failure on the stroke fixture, issue 13).

For every training and validation case of the fold that has a foreground class: the mask latent z0 of its label
map, the latent of an all-background map z_bg, and the model's one-step prediction z_hat, all from the trained
checkpoint (its mask autoencoder, latent scale and denoiser). Per class, over the latent cells that lie at least
half inside that class: the mean code shift z0 - z_bg (the direction the class is written in), its length,
the cosine between the classes' shifts, how far the prediction moved along its class's shift (0: stayed
background, 1: reached the class), and what the prediction decodes to inside the class.

    python benchmarks/latent_class_codes.py --work_dir /tmp/fixture64 -d 984 -tr nnDiffSegTrainerLatent
"""
import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from common import nnunet_env  # noqa: E402

PLANS = "nnDiffSegPlans"
VARIANTS_DIR = HERE.parent / "latent_lever_trainers"  # latent_levers.py's (importing it loads nnU-Net too early)


def _cases(predictor, raw: Path, cases: list, dataset_json: dict):
    """(image (1, C, H, W), labels (1, 1, H, W)) per case, preprocessed as for training and padded to the patch."""
    import numpy as np
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    reader = predictor.plans_manager.image_reader_writer_class()
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    patch = predictor.configuration_manager.patch_size
    for case in cases:
        images = sorted(str(f) for f in (raw / "imagesTr").glob(f"{case}_*{dataset_json['file_ending']}"))
        image, properties = reader.read_images(images)
        seg, _ = reader.read_seg(str(raw / "labelsTr" / f"{case}{dataset_json['file_ending']}"))
        image, seg, _ = preprocessor.run_case_npy(image, seg, properties, predictor.plans_manager,
                                                  predictor.configuration_manager, dataset_json)
        image, seg = pad_nd_image(image[:, 0], patch), pad_nd_image(np.maximum(seg[:, 0], 0), patch)
        yield torch.from_numpy(image)[None].float(), torch.from_numpy(seg)[None].long()


def measure(model_folder: Path, raw: Path, fold: int) -> dict:
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), [fold], "checkpoint_final.pth")
    head = predictor.network
    dataset_json = load_json(str(model_folder / "dataset.json"))
    split = load_json(str(Path(os.environ["nnUNet_preprocessed"]) / raw.name / "splits_final.json"))[fold]
    classes = range(1, head.num_classes)
    shift = {k: [] for k in classes}
    moved = {k: [] for k in classes}
    decoded = {k: np.zeros(head.num_classes) for k in classes}
    with torch.no_grad():
        for image, labels in _cases(predictor, raw, split["train"] + split["val"], dataset_json):
            if not (labels > 0).any():
                continue
            z0, z_bg = head.encode_mask(labels), head.encode_mask(torch.zeros_like(labels))
            z_hat = head.sample_latent(head.image_encoder(image))
            predicted = head.decode_mask(z_hat).argmax(1)[0]
            for k in classes:
                inside = labels[0, 0] == k
                if not inside.any():
                    continue
                cells = torch.nn.functional.adaptive_avg_pool2d(inside[None, None].float(), z0.shape[-2:])[0, 0] >= 0.5
                if cells.any():
                    shift[k].append((z0 - z_bg)[0][:, cells].mean(1))
                    moved[k].append((z_hat - z_bg)[0][:, cells].mean(1))
                decoded[k] += np.bincount(predicted[inside].numpy(), minlength=head.num_classes)
    result = {"classes": {}}
    mean_shift = {k: torch.stack(v).mean(0) for k, v in shift.items() if v}
    for k, v in mean_shift.items():
        along = torch.stack(moved[k]).mean(0) @ v / (v @ v)
        result["classes"][str(k)] = {"cases": len(shift[k]), "code_shift": [round(float(x), 3) for x in v],
                                     "code_shift_length": float(v.norm()), "prediction_moved_along_shift": float(along),
                                     "decoded_inside_as": (decoded[k] / decoded[k].sum()).round(3).tolist()}
    keys = sorted(mean_shift)
    result["cosine"] = {f"{a}-{b}": float(torch.nn.functional.cosine_similarity(mean_shift[a], mean_shift[b], 0))
                        for i, a in enumerate(keys) for b in keys[i + 1:]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True, help="a benchmark's work folder (its nnUNet_* folders)")
    parser.add_argument("-d", type=int, required=True, help="dataset ID")
    parser.add_argument("-tr", default="nnDiffSegTrainerLatent", help="the latent trainer")
    parser.add_argument("-f", type=int, default=0, help="fold")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args()
    os.environ.update(nnunet_env(Path(args.work_dir)))  # before nnU-Net is imported: it reads them once
    from nndiffseg.ext_trainer import with_ext_trainer_dir
    from nndiffseg.inference.predict import _resolve_model_folder
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    os.environ["nnUNet_extTrainer"] = with_ext_trainer_dir(
        os.pathsep.join([str(VARIANTS_DIR), os.environ.get("nnUNet_extTrainer", "")]))
    raw = Path(os.environ["nnUNet_raw"]) / maybe_convert_to_dataset_name(args.d)
    result = measure(_resolve_model_folder(args.d, args.tr, PLANS, "2d"), raw, args.f)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
