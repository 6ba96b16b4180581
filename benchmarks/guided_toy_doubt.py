"""Do the guided head's one-step samples carry doubt, per prediction type? A toy where part of the answer is a
coin flip (tests/test_guided_heads.py's squares: a grey block at a fixed place is foreground in half the cases,
a bright block elsewhere always), a tiny head trained per prediction type and seed, then sampled with one DDIM
step and K samples: the samples' spread (std of the foreground probability) on the coin-flip block and
elsewhere, and how often the thresholded samples all agree there.

    python benchmarks/guided_toy_doubt.py --steps 400 --seeds 0 1 2 --num_samples 8

Head only (no nnU-Net), one thread, about 30 s per trained head.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_guided_heads import TRAINER_HEAD_SETTINGS, _square_cases, trained_square_head  # noqa: E402

PREDICTION_TYPES = ("sample", "v_prediction", "epsilon")


def measure(prediction_type: str, seed: int, steps: int, num_samples: int) -> dict:
    segmenter, rng = trained_square_head({**TRAINER_HEAD_SETTINGS, "prediction_type": prediction_type}, seed, steps)
    images, _ = _square_cases(rng, 4)
    with torch.no_grad():
        samples = segmenter.sample(images, num_samples=num_samples)[:, :, 1]
    unsure = torch.zeros(16, 16, dtype=torch.bool)
    unsure[5:11, 2:7] = True
    spread = samples.std(0, unbiased=False)
    foreground = samples > 0.5
    agree = (foreground == foreground[0]).all(0).float()
    return {"spread_unsure": spread[:, unsure].mean().item(), "spread_sure": spread[:, ~unsure].mean().item(),
            "agree_unsure": agree[:, unsure].mean().item(), "agree_sure": agree[:, ~unsure].mean().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--prediction_types", nargs="+", choices=PREDICTION_TYPES, default=list(PREDICTION_TYPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"    python benchmarks/guided_toy_doubt.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print("| prediction type | spread, coin-flip block | spread, elsewhere | samples agree, coin-flip block | "
          "samples agree, elsewhere |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for prediction_type in args.prediction_types:
        runs = [measure(prediction_type, seed, args.steps, args.num_samples) for seed in args.seeds]

        def span(key: str, percent: bool = False) -> str:
            values = [r[key] * (100 if percent else 1) for r in runs]
            fmt = "{:.0f} %" if percent else "{:.3f}"
            return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"
        print(f"| {prediction_type} | {span('spread_unsure')} | {span('spread_sure')} | "
              f"{span('agree_unsure', True)} | {span('agree_sure', True)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
