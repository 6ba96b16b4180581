"""Training and prediction time of each nndiffseg trainer against nnUNetTrainer's, in one run.

    python benchmarks/timing.py --work_dir /tmp/timing                    # quick: toy data, about 5 min on 2 idle cores
    python benchmarks/timing.py --work_dir /tmp/timing256 --scenario full  # 256 x 256, 4 x 20 iterations
"""
import sys

from harness import Model, Scenario, main

GUIDED = Model("nnDiffSegTrainerGuided", train_args=("--clip_model", "random"))
LATENT = [Model("nnDiffSegTrainerMaskVAE", predict=False), Model("nnDiffSegTrainerLatent")]

SCENARIOS = [
    Scenario("quick", [Model("nnUNetTrainer"), GUIDED, *LATENT], size=128, num_train=10, num_test=32, epochs=4,
             iters=10, note="the before/after check of a refactor: a toy run, the ratios are what counts"),
    Scenario("full", [Model("nnUNetTrainer"), GUIDED, *LATENT], size=256, num_train=40, num_test=16, epochs=4,
             iters=20),
]

if __name__ == "__main__":
    sys.exit(main(SCENARIOS))
