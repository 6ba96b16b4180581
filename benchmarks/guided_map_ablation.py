"""Which part of the guided default's uncertainty map finds its errors: the samples' spread, the prior's own
variance, or both (``--uncertainty total``, the default for new models)? Read from a finished
benchmarks/guided_uncertainty.py work folder that predicted a setting both ways (e.g. ``ddim-1 K3`` and
``ddim-1 K3 total``) and the prior alone; nothing is retrained or predicted again.

For every case, against the guided prediction's wrong pixels (its label map against the reference):
- ``spread``: the map written with ``--uncertainty spread``;
- ``prior``: the prior's standard deviation sqrt(p (1 - p)) (averaged over classes), from the prior-alone
  prediction's probabilities (the same U-Net, predicted by nnU-Net's predictor);
- ``total``: the map written with ``--uncertainty total``; its identity total^2 = spread^2 + prior^2 (two
  classes) is checked, so the two prediction runs and the prior-alone run are known to belong together.

    python benchmarks/guided_map_ablation.py --work_dir /tmp/gu_f1 --setting 'ddim-1 K3'
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from nndiffseg.evaluation.metrics import dice
from nndiffseg.evaluation.uncertainty_metrics import failure_detection

PRIOR_FOLDER = "prior_alone_guided_models_U-Net"  # as guided_uncertainty.py names the prior-alone row's folder
TOLERANCE = 0.02  # of the identity, after each map's resampling and float32 export


def _folder(setting: str) -> str:
    return "guided_" + setting.replace(" ", "_")


def ablation(work: Path, setting: str) -> dict:
    """{source: failure_detection numbers} plus 'cases' and the identity's largest deviation."""
    spread_dir, total_dir = (work / "predictions" / _folder(s) for s in (setting, f"{setting} total"))
    prior_dir = work / "predictions" / PRIOR_FOLDER
    cases = sorted(p.stem for p in (work / "val_labels").glob("*.png"))
    maps = {"spread": [], "prior": [], "total": []}
    case_mean = {k: [] for k in maps}
    errors, risk, worst = [], [], 0.0
    for case in cases:
        ref = np.array(Image.open(work / "val_labels" / f"{case}.png")).astype(np.int64)
        pred = np.array(Image.open(total_dir / f"{case}.png")).astype(np.int64)
        if not np.array_equal(pred, np.array(Image.open(spread_dir / f"{case}.png"))):
            raise ValueError(f"{case}: the spread and total runs predicted different masks (not the same model/seed)")
        prior_p = np.load(prior_dir / f"{case}.npz")["probabilities"].reshape(-1, *ref.shape)
        case_maps = {"spread": np.load(spread_dir / "uncertainty" / f"{case}.npz")["uncertainty"].reshape(ref.shape),
                     "prior": np.sqrt(np.clip(prior_p * (1 - prior_p), 0, None)).mean(axis=0),
                     "total": np.load(total_dir / "uncertainty" / f"{case}.npz")["uncertainty"].reshape(ref.shape)}
        if prior_p.shape[0] == 2:
            identity = np.sqrt(case_maps["spread"] ** 2 + case_maps["prior"] ** 2)
            worst = max(worst, float(np.abs(identity - case_maps["total"]).max()))
        for name, m in case_maps.items():
            maps[name].append(m.ravel())
            case_mean[name].append(float(m.mean()))
        wrong = pred != ref
        errors.append(wrong.ravel())
        risk.append(1.0 - dice(pred > 0, ref > 0))  # NaN for a case without foreground: left out, as evaluate does
    error = np.concatenate(errors)
    result = {name: failure_detection(np.concatenate(m), error, case_mean[name], risk) for name, m in maps.items()}
    return {**result, "cases": len(cases), "identity_deviation": worst, "dice": 1.0 - float(np.nanmean(risk))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="a benchmarks/guided_uncertainty.py work folder")
    parser.add_argument("--setting", default="ddim-1 K3",
                        help="the sampling setting predicted both ways (SETTING and 'SETTING total')")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    needed = [work / "predictions" / _folder(s) / "uncertainty" for s in (args.setting, f"{args.setting} total")]
    missing = [str(p) for p in needed + [work / "predictions" / PRIOR_FOLDER] if not p.is_dir()]
    if missing:
        print(f"ERROR: not found: {', '.join(missing)} (run benchmarks/guided_uncertainty.py with --settings "
              f"'{args.setting}' '{args.setting} total' first)", file=sys.stderr)
        return 2
    r = ablation(work, args.setting)
    if r["identity_deviation"] > TOLERANCE:
        print(f"ERROR: total^2 = spread^2 + prior^2 is off by up to {r['identity_deviation']:.3f}: the folders do not "
              f"come from the same model", file=sys.stderr)
        return 1
    print(f"    python benchmarks/guided_map_ablation.py --work_dir {args.work_dir} --setting '{args.setting}'\n")
    print(f"{r['cases']} cases, guided Dice {r['dice']:.3f}; identity total^2 = spread^2 + prior^2 holds to "
          f"{r['identity_deviation']:.4f}\n")
    print("| map | pixel AUROC | overlap | case Spearman | AURC |\n| --- | ---: | ---: | ---: | ---: |")
    for name in ("spread", "prior", "total"):
        m = r[name]
        print(f"| {name} | {m['pixel_auroc']:.3f} | {m['uncertainty_error_overlap']:.3f} | {m['case_spearman']:.2f} | "
              f"{m['aurc']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
