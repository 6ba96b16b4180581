"""Head to head on the real ISIC 2017 sample ($NNDIFFSEG_SHARED_DATA/isic2017_sample): nnUNetTrainer, the guided
trainer at its defaults and the latent trainer, same fold and iterations; nnUNetTrainer again at about the guided
trainer's training time. Quality is compared per case (paired Dice, Wilcoxon) on fold 0's validation cases.

    OMP_NUM_THREADS=1 python benchmarks/isic_head_to_head.py --work_dir /tmp/h2h128
    # not run yet (estimate: 1.5 h on 2 cores)
"""
import sys

from harness import Model, Scenario, main

GUIDED = "nnDiffSegTrainerGuided"
MODELS = [
    Model("nnUNetTrainer"),
    Model(GUIDED, train_args=("--clip_model", "random")),
    Model(GUIDED, predict_args=("--num_samples", "5"), label=f"{GUIDED} K5"),
    Model(GUIDED, predict_args=("--steps", "10"), label=f"{GUIDED} ddim:10"),
    Model("nnDiffSegTrainerMaskVAE", predict=False),
    Model("nnDiffSegTrainerLatent"),
    # about the guided trainer's training time (3.5x nnU-Net's per iteration in the 64 px run of the docs)
    Model("nnUNetTrainer", train_args=("--num_epochs", "42"), label="nnUNetTrainer (equal time)",
          results="nnUNet_results_equal_time"),
]

SCENARIOS = [
    Scenario("cpu128", MODELS, dataset="isic", size=128, epochs=12, iters=25, dataset_id=983),
    Scenario("gpu512", MODELS, dataset="isic", size=512, epochs=100, iters=250, device="cuda", dataset_id=983),
]

if __name__ == "__main__":
    sys.exit(main(SCENARIOS))
