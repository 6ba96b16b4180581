"""Every trainer trained a few iterations and predicted on one CUDA GPU (nnU-Net's mixed precision), timed against
nnUNetTrainer: docs/benchmarks.md, "GPU check", says how to carry the wheels the GPU machine lacks.

    nnUNet_compile=f python benchmarks/gpu_check.py --work_dir $OUT/gpu_check               # about 5 min
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --work_dir /tmp/gpu_dry --scenario dry_run   # on a CPU
"""
import sys

from harness import Model, Scenario, main

MODELS = [
    Model("nnUNetTrainer"),
    Model("nnDiffSegTrainerGuided", train_args=("--clip_model", "random")),
    Model("nnDiffSegTrainerMaskVAE", predict=False),
    Model("nnDiffSegTrainerLatent"),
    # Stable Diffusion's architecture with random weights (none can be downloaded there): its time, not its Dice
    Model("nnDiffSegTrainerLatent_sd", train_args=("--sd_weights", "random")),
]

SCENARIOS = [
    Scenario("gpu", MODELS, size=256, num_train=20, num_test=16, epochs=3, iters=20, device="cuda"),
    Scenario("dry_run", MODELS, size=64, num_train=10, num_test=4, epochs=1, iters=2),
]

if __name__ == "__main__":
    sys.exit(main(SCENARIOS))
