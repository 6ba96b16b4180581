"""Design choices of the guided diffusion head, measured on 3-class toy discs (64 x 64, no nnU-Net loop):
the prediction type (noise, x0 or v) and the way the class prompts enter (time embedding or cross-attention).

Each variant trains the whole model jointly as nnDiffSegTrainerGuided does (nnU-Net's planned U-Net for
64 x 64 as the prior with nnU-Net's Dice + CE at weight 10, the small denoiser, AdamW 1e-3, batch 2) from
the same seed and data stream, and reports the Dice of one DDIM-10 sample and of the prior alone on 16
held-out cases every 100 iterations. One process per variant, one thread each, two at a time.

    python benchmarks/guided_design_choices.py --iters 300
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
VARIANTS = {"eps/time": ("epsilon", "time"), "x0/time": ("sample", "time"), "v/time": ("v_prediction", "time"),
            "x0/cross-attention": ("sample", "cross_attention")}


def _toy_batch(rng, n):
    import torch
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from toy_data import toy_case
    images, labels = zip(*[toy_case(rng, 64, 64, 2) for _ in range(n)])
    images = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() - 90) / 40
    return images, torch.from_numpy(np.stack(labels))[:, None].long()


def _dice(prediction, reference) -> list:
    return [round(float(2 * ((prediction == c) & (reference == c)).sum() /
                        ((prediction == c).sum() + (reference == c).sum())), 3) for c in (1, 2)]


def run_variant(prediction_type: str, conditioning: str, iters: int) -> list:
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from nndiffseg.guided.denoiser import build_denoiser
    from nndiffseg.guided.segmenter import GuidedSegmenter
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # nnU-Net's 2D plan for 64 x 64 RGB toy images (nnDiffSegPlans)
    prior = PlainConvUNet(3, 5, [32, 64, 128, 256, 512], torch.nn.Conv2d, 3, [1, 2, 2, 2, 2], [2] * 5, 3, [2] * 4,
                          True, torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None,
                          torch.nn.LeakyReLU, {"inplace": True})
    model = GuidedSegmenter(prior, build_denoiser(3, 3, 1024, conditioning, "small", (64, 64)),
                            prediction_type=prediction_type)
    model.set_text_embeddings(torch.nn.functional.normalize(torch.randn(3, 1024), dim=1))
    prior_loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    model.set_prior_loss(prior_loss)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-2)
    rng = np.random.default_rng(1)
    test_images, test_labels = _toy_batch(np.random.default_rng(9), 16)
    rows, start = [], time.time()
    for it in range(1, iters + 1):
        model.train()
        loss = model(*_toy_batch(rng, 2))["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        optimizer.step()
        if it % 100 == 0:
            model.eval()
            with torch.no_grad():
                sample = model.sample(test_images, 1, "ddim", 10)[0].argmax(1)
                prior_only = model.prior(test_images).argmax(1)
            rows.append({"iteration": it, "seconds": round(time.time() - start), "sample_dice": _dice(sample, test_labels[:, 0]),
                         "prior_dice": _dice(prior_only, test_labels[:, 0])})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(run_variant(*args._child, args.iters)))
        return 0
    results = {}
    for i in range(0, len(args.variants), 2):
        running = {name: subprocess.Popen([sys.executable, str(HERE), "--iters", str(args.iters), "--_child",
                                           *VARIANTS[name]], stdout=subprocess.PIPE, text=True)
                   for name in args.variants[i:i + 2]}
        for name, process in running.items():
            out, _ = process.communicate()
            if process.returncode != 0:
                sys.exit(f"ERROR: variant {name} failed")
            results[name] = json.loads(out.strip().splitlines()[-1])
    print("| variant | iteration | DDIM-10 sample Dice (class 1 / 2) | prior Dice (class 1 / 2) |")
    print("| --- | ---: | --- | --- |")
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['iteration']} | {r['sample_dice'][0]:.3f} / {r['sample_dice'][1]:.3f} | "
                  f"{r['prior_dice'][0]:.3f} / {r['prior_dice'][1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
