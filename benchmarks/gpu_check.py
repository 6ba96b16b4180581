"""GPU check of every trainer, in one command of under 8 minutes on one CUDA GPU (or a CPU dry run).

Steps, each in its own child process with its own timeout (a failing step records its error and the rest
still run), in this order, stopping early only when the time budget (--budget_s) is spent:
1. a synthetic dermoscopy dataset (``nndiffseg.demo.synthetic_dermoscopy``, ISIC 2016 layout, RGB PNG)
   converted with ``convert_isic`` and planned with ``nnDiffSeg_plan_and_preprocess -d ID -np 1 -npfp 1``;
2. ``nnDiffSeg_train ID 2d 0 -tr NAME -device DEV --num_epochs 1 --iters_per_epoch N`` for nnUNetTrainer,
   nnDiffSegTrainerGuided (--clip_model random), nnDiffSegTrainerMaskVAE, nnDiffSegTrainerLatent (finds
   fold 0's MaskVAE checkpoint itself) and nnDiffSegTrainerLatent_sd (--sd_weights random; no fine-tuned
   MaskVAE_sd, so its mask autoencoder is random), all with nnUNet_compile=false (torch.compile is step 6)
   unless --compile_diffusion; nnU-Net's mixed precision is on by itself on CUDA. The child runs the
   CLI's own entry point with timers around the trainer's train_step (CUDA-synchronised), run_training and
   the final validation, and reads torch.cuda.max_memory_allocated after the training loop;
3. ``nnDiffSeg_predict -i imagesTs -o OUT -d ID -c 2d -tr NAME -f 0 -device DEV --disable_tta -nps 0`` for
   nnUNetTrainer, nnDiffSegTrainerGuided (default sampler), nnDiffSegTrainerLatent and
   nnDiffSegTrainerLatent_sd (one child, the CLI entry point run once per trainer, nnUNet_compile=false),
   with timers around nnU-Net's predictor call per image and its sliding window;
4. images per second of the latent single step (LatentSegmenter built directly, presets compact and sd,
   eval mode, torch.inference_mode, autocast bf16 and fp16 on CUDA, input (32, 3, 256, 256));
5. DDP with one GPU: (a) a guided and a latent head (small, as tests/ddp_worker.py builds them) wrapped in
   DistributedDataParallel(device_ids=[0]) after init_process_group("nccl", world_size=1), three training
   steps each; (b) the real trainer under DDP: ``nnDiffSeg_train ID 2d 1 -tr nnDiffSegTrainerGuided
   -num_gpus 2 ...`` with torch.multiprocessing.spawn replaced by a call of its rank function as rank 0 of
   a world of 1 (nccl on CUDA), so nnU-Net's DDP path (SyncBatchNorm, DDP wrapper, rank check) runs on one
   GPU; (c) only with --cpu_ddp and enough budget left: the real 2-process gloo
   run ``-device cpu -num_gpus 2`` on fold 2;
6. last, with what is left of the budget (CUDA only): nnUNetTrainer with nnUNet_compile=true on fold 3,
   recording whether nnU-Net compiled the network and what the first and the later iterations cost.
Writes OUT_DIR/gpu_check.json (everything, errors included, rewritten after every step),
OUT_DIR/gpu_check.md (the tables) and OUT_DIR/gpu_check_log.txt (every child's output).

    python benchmarks/gpu_check.py --device cuda                      # the GPU check, about 6-8 minutes
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --tiny   # dry run: 64x64, 2 iterations

On the lent GPU machine (Python 3.12, torch 2.11, no network, none of nnunetv2, dynamic-network-architectures,
batchgenerators(v2), acvl-utils, diffusers, open_clip_torch, SimpleITK, blosc2, nibabel, yacs), the wheels
travel in .whl/ (git-ignored through .git/info/exclude; about 55 MB, under the 64 MiB a call may carry).
Made here, once, by benchmarks/gpu_check_wheels.sh, which runs (PLATFORMS = --platform
manylinux_2_28_x86_64 ... manylinux1_x86_64):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp PLATFORMS -d .whl \\
      nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \\
      diffusers==0.42.1 open_clip_torch==3.3.0 blosc2==4.14.1 nibabel==5.4.2 yacs==0.1.8 \\
      connected-components-3d==4.1.1 ftfy==6.3.1 wcwidth==0.9.4 ndindex==1.10.1 numexpr==2.14.2 \\
      graphviz==0.21 future==1.0.0
    pip download --no-binary=:all: acvl-utils==0.2.6 && pip wheel --no-deps acvl_utils-0.2.6.tar.gz -w .whl
    SimpleITK==2.5.7 (53 MB wheel) repacked: unzip it, tar | xz -6  ->  .whl/SimpleITK-2.5.7.tar.xz (29 MB)

(the machine has numpy, scipy, scikit-image, scikit-learn, matplotlib, pandas, seaborn, tqdm, timm, pillow,
torchvision, einops, huggingface-hub, safetensors, regex, requests, filelock, tifffile, msgpack, httpx, rich,
pyyaml; imagecodecs, which nnunetv2 lists, is not imported on this path and is left out). nnunetv2 imports
SimpleITK at module level (its reader/writer registry) and so does nndiffseg's guided fusion, so it cannot be
left out; hence the xz repack (one call carries everything) rather than two back-to-back calls (the first
carrying SimpleITK's wheel alone into /tmp/site, the second the rest within the machine's 30 s warm window).
There, from the repository root (run tool, carry [".whl"], timeout_s 560; the script's own budget is 420 s):

    set -o pipefail; export PYTHONUNBUFFERED=1; nvidia-smi -L
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    tar xJf .whl/SimpleITK-2.5.7.tar.xz -C /tmp/site      # or python3's tarfile, where there is no xz
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/proj .
    export PYTHONPATH=/tmp/proj:/tmp/site
    python3 benchmarks/gpu_check.py --device cuda --out_dir $OUT 2>&1 | tee $OUT/gpu_check_console.txt

The project is installed (into /tmp/proj), not put on PYTHONPATH as a folder: setup.py maps trainers/ to
nndiffseg.trainers (where pip cannot build it, copying nndiffseg/ to /tmp/proj/nndiffseg and trainers/ and
dataset_conversion/ into that gives the same tree). The children run with the work folder as their current
directory, so the repository's own nndiffseg/ folder never shadows the installed package.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve()
DATASET_ID = 977
MARK = "GPU_CHECK_RESULT "
TRAINERS = ["nnUNetTrainer", "nnDiffSegTrainerGuided", "nnDiffSegTrainerMaskVAE", "nnDiffSegTrainerLatent",
            "nnDiffSegTrainerLatent_sd"]
PREDICTORS = ["nnUNetTrainer", "nnDiffSegTrainerGuided", "nnDiffSegTrainerLatent", "nnDiffSegTrainerLatent_sd"]
WARMUP_ITERS = 3  # training iterations left out of the median (cuDNN autotuning, torch.compile, allocator)
CPU_SKIP = "skipped (cpu)"
DDP1 = "train:nnDiffSegTrainerGuided@ddp1"
COMPILE = "train:nnUNetTrainer@compile"


def trainer_options(trainer: str) -> list:
    if "Guided" in trainer:
        return ["--clip_model", "random"]
    if trainer.endswith("_sd"):
        return ["--sd_weights", "random"]
    return []


# ====================================================================== child side (one step per process)
def emit(result: dict) -> None:
    print(MARK + json.dumps(result, default=str), flush=True)


def _sync(cuda: bool) -> None:
    if cuda:
        import torch
        torch.cuda.synchronize()


def _peak_mib(cuda: bool) -> Optional[float]:
    if not cuda:
        return None
    import torch
    return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)


def _run_entry(entry, prog: str, argv: list) -> int:
    """A CLI entry point as if run from the shell; its exit status (run_cli ends with sys.exit)."""
    sys.argv = [prog, *map(str, argv)]
    try:
        entry()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def _env_info() -> dict:
    import platform

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    from importlib import metadata
    for dist in ("nnunetv2", "diffusers", "open_clip_torch", "SimpleITK", "dynamic_network_architectures",
                 "batchgeneratorsv2", "blosc2", "numpy", "nndiffseg"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def child_prepare(size: int, num_train: int, num_test: int) -> int:
    from nndiffseg.dataset_conversion.isic import convert_isic
    from nndiffseg.demo.synthetic_dermoscopy import write_isic2016_layout
    from nndiffseg.planning.plan_and_preprocess import plan_and_preprocess_entry
    work = Path.cwd()
    start = time.perf_counter()
    source = write_isic2016_layout(work / "synthetic_isic2016", num_train, num_test, height=size, width=size)
    dataset = convert_isic(source, DATASET_ID, num_processes=1)
    made = time.perf_counter()
    code = _run_entry(plan_and_preprocess_entry, "nnDiffSeg_plan_and_preprocess",
                      ["-d", DATASET_ID, "-np", 1, "-npfp", 1])
    result = {"key": "prepare", "dataset": str(dataset), "make_s": round(made - start, 2),
              "plan_s": round(time.perf_counter() - made, 2), "exit_code": code, "env": _env_info()}
    plans_file = Path(os.environ["nnUNet_preprocessed"]) / dataset.name / "nnDiffSegPlans.json"
    if plans_file.is_file():
        config = json.loads(plans_file.read_text())["configurations"]["2d"]
        result.update(patch_size=config.get("patch_size"), batch_size=config.get("batch_size"))
    emit(result)
    return code


def child_train(argv: list) -> int:
    """nnDiffSeg_train with timers; argv: TAG (results go under train:TRAINER@TAG; '-' for none) and the CLI's
    arguments. TAG ddp1: run the -num_gpus >= 2 path as rank 0 of a world of 1."""
    tag, argv = argv[0], argv[1:]
    ddp1 = tag == "ddp1"
    import torch
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    import nndiffseg.run.train as train_module
    from nndiffseg.registry import find_trainer_class
    name = argv[argv.index("-tr") + 1]
    cuda = argv[argv.index("-device") + 1] == "cuda"
    cls = find_trainer_class(name)
    info = {"key": f"train:{name}" + ("" if tag == "-" else f"@{tag}"), "compiled": None, "ddp": None,
            "world_size": None}
    times: list = []

    def summary(partial: bool) -> dict:
        """What is known so far (emitted as the run goes, so a step stopped by its timeout still reports)."""
        out = dict(info, iterations=len(times), partial=partial)
        if times:
            steady = times[WARMUP_ITERS:] or times[1:] or times
            out.update(first_iter_s=round(times[0], 4), s_per_iter=round(statistics.median(steady), 5),
                       median_of=f"iterations {len(times) - len(steady) + 1}-{len(times)}")
        return out

    orig_step = cls.train_step

    def train_step(self, batch):
        if info["compiled"] is None:
            net = self.network
            info["ddp"] = isinstance(net, DistributedDataParallel)
            net = net.module if info["ddp"] else net
            info["compiled"] = isinstance(net, OptimizedModule)
            info["batch_size"] = int(batch["data"].shape[0])
            info["patch_size"] = list(batch["data"].shape[2:])
            info["parameters_m"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
            if self.is_ddp:
                import torch.distributed as dist
                info["world_size"] = dist.get_world_size()
                info["backend"] = dist.get_backend()
        _sync(cuda)
        start = time.perf_counter()
        out = orig_step(self, batch)
        _sync(cuda)
        times.append(time.perf_counter() - start)
        if len(times) in (1, WARMUP_ITERS + 1):
            emit(summary(True))
        return out

    orig_run = cls.run_training

    def run_training(self):
        start = time.perf_counter()
        orig_run(self)
        info["train_loop_s"] = round(time.perf_counter() - start, 2)
        info["peak_train_mib"] = _peak_mib(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        emit(summary(True))

    orig_val = cls.perform_actual_validation

    def perform_actual_validation(self, *a, **k):
        start = time.perf_counter()
        orig_val(self, *a, **k)
        info["final_validation_s"] = round(time.perf_counter() - start, 2)

    cls.train_step, cls.run_training, cls.perform_actual_validation = \
        train_step, run_training, perform_actual_validation

    if ddp1:  # train() spawns -num_gpus ranks; run its rank function here as rank 0 of 1 instead
        real_count = torch.cuda.device_count

        def spawn(fn, args=(), nprocs=1, join=True, **kwargs):
            torch.cuda.device_count = real_count
            fn(0, 1, *args[1:])  # args = (num_gpus, *train's arguments)

        torch.cuda.device_count = lambda: max(2, real_count())  # only for train()'s GPU count check
        torch.multiprocessing.spawn = spawn
    try:
        code = _run_entry(train_module.train_entry, "nnDiffSeg_train", argv)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then the traceback in the log
        traceback.print_exc()
        info["error"] = f"{type(e).__name__}: {e}"
        code = 1
    info["exit_code"] = code
    emit(summary(False))
    return code


def child_predict(argv: list) -> int:
    """nnDiffSeg_predict once per trainer (argv: DEVICE IMAGES OUT_ROOT TRAINER...), with timers."""
    device, images, out_root, *trainers = argv
    cuda = device == "cuda"
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nndiffseg.inference.predict import predict_entry
    state: dict = {}
    orig_call = nnUNetPredictor.predict_logits_from_preprocessed_data
    orig_window = nnUNetPredictor.predict_sliding_window_return_logits
    orig_init = nnUNetPredictor.initialize_from_trained_model_folder

    def timed(orig, key):
        def wrapper(self, *a, **k):
            _sync(cuda)
            start = time.perf_counter()
            out = orig(self, *a, **k)
            _sync(cuda)
            state[key].append(time.perf_counter() - start)
            return out
        return wrapper

    def init(self, *a, **k):
        start = time.perf_counter()
        orig_init(self, *a, **k)
        state["load_s"] = round(time.perf_counter() - start, 2)
        state["loop_start"] = time.perf_counter()

    nnUNetPredictor.predict_logits_from_preprocessed_data = timed(orig_call, "call_s")
    nnUNetPredictor.predict_sliding_window_return_logits = timed(orig_window, "window_s")
    nnUNetPredictor.initialize_from_trained_model_folder = init
    worst = 0
    for trainer in trainers:
        state.clear()
        state.update(call_s=[], window_s=[])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out = Path(out_root) / trainer
        argv = ["-i", images, "-o", out, "-d", DATASET_ID, "-c", "2d", "-tr", trainer, "-f", "0", "-device", device,
                "--disable_tta", "-nps", "0"]
        info = {"key": f"predict:{trainer}", "command": "nnDiffSeg_predict " + " ".join(map(str, argv))}
        try:
            code = _run_entry(predict_entry, "nnDiffSeg_predict", argv)
        except BaseException as e:  # noqa: BLE001
            traceback.print_exc()
            info["error"] = f"{type(e).__name__}: {e}"
            code = 1
        end = time.perf_counter()
        calls, windows = state["call_s"], state["window_s"]
        info.update(exit_code=code, images=len(calls), load_s=state.get("load_s"), peak_mib=_peak_mib(cuda),
                    written=len(list(out.glob("*.png"))) if out.is_dir() else 0)
        if calls:
            steady = calls[1:] or calls  # the first image pays cuDNN's autotuning and lazy CUDA set-up
            info["first_image_s"] = round(calls[0], 4)
            info["call_s_per_image"] = round(statistics.median(steady), 5)
            info["window_s_per_image"] = round(statistics.median(windows[1:] or windows), 5)
            info["loop_s_per_image"] = round((end - state["loop_start"]) / len(calls), 5)
        emit(info)
        worst = max(worst, code)
    return worst


def child_throughput(argv: list) -> int:
    """Images per second of LatentSegmenter's single step (argv: DEVICE BATCH SIZE ITERS PRESET...)."""
    device, batch, size, iters, *presets = argv
    batch, size, iters = int(batch), int(size), int(iters)
    cuda = device == "cuda"
    import torch

    from nndiffseg.latent.autoencoders import build_autoencoder, build_denoiser
    from nndiffseg.latent.mask_encoding import mask_channels
    from nndiffseg.latent.segmenter import LatentSegmenter
    torch.backends.cudnn.benchmark = True
    dtypes = [("bf16", torch.bfloat16), ("fp16", torch.float16)] if cuda else [("fp32", None)]
    worst = 0
    for preset in presets:
        head = None
        try:
            torch.manual_seed(0)
            head = LatentSegmenter(build_autoencoder(preset, 3), build_autoencoder(preset, mask_channels(2)),
                                   build_denoiser(preset), 2, 3, preset=preset, steps=1)
            head = head.to(device).eval()
            params = round(sum(p.numel() for p in head.parameters()) / 1e6, 1)
            x = torch.randn(batch, 3, size, size, device=device)
        except BaseException as e:  # noqa: BLE001
            traceback.print_exc()
            emit({"key": f"throughput:{preset}", "error": f"{type(e).__name__}: {e}"})
            worst = 1
            continue
        for label, dtype in dtypes:
            info = {"key": f"throughput:{preset}:{label}", "preset": preset, "dtype": label, "batch": batch,
                    "size": size, "parameters_m": params, "iters": iters}
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32,
                                                            enabled=dtype is not None):
                    start = time.perf_counter()
                    out = head(x)
                    _sync(cuda)
                    info["first_call_s"] = round(time.perf_counter() - start, 3)
                    for _ in range(2):  # warm-up
                        head(x)
                    _sync(cuda)
                    start = time.perf_counter()
                    for _ in range(iters):
                        out = head(x)
                    _sync(cuda)
                    elapsed = time.perf_counter() - start
                info.update(images_per_s=round(batch * iters / elapsed, 1),
                            ms_per_batch=round(1000 * elapsed / iters, 2), peak_mib=_peak_mib(cuda),
                            output_shape=list(out.shape), output_finite=bool(torch.isfinite(out).all()))
            except BaseException as e:  # noqa: BLE001
                traceback.print_exc()
                info["error"] = f"{type(e).__name__}: {e}"
                worst = 1
            emit(info)
        del head
        if cuda:
            torch.cuda.empty_cache()
    return worst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_head(kind: str):
    """The heads of tests/ddp_worker.py: a guided head on a two-layer prior, a latent head on small
    autoencoders with the compact denoiser."""
    import torch
    from diffusers import AutoencoderKL
    from torch import nn

    from nndiffseg.guided.denoiser import build_denoiser as build_guided_denoiser
    from nndiffseg.guided.segmenter import GuidedSegmenter
    from nndiffseg.latent.autoencoders import build_denoiser as build_latent_denoiser
    from nndiffseg.latent.segmenter import LatentSegmenter
    torch.manual_seed(0)
    if kind == "guided":
        prior = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
        head = GuidedSegmenter(prior, build_guided_denoiser(3, 1, 16, "cross_attention", (8, 16)),
                               prediction_type="sample")
        head.set_prior_loss(lambda output, target: nn.functional.cross_entropy(output.float(), target[:, 0].long()))
        return head

    def autoencoder():
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             norm_num_groups=4, layers_per_block=1)
    return LatentSegmenter(autoencoder(), autoencoder(), build_latent_denoiser("compact"), 3, 1)


def child_ddp_heads(argv: list) -> int:
    """Three DDP training steps of a guided and a latent head, world size 1 (nccl on CUDA, gloo on CPU)."""
    device = argv[0]
    cuda = device == "cuda"
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    backend = "nccl" if cuda else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if cuda:
        torch.cuda.set_device(0)
    worst = 0
    try:
        dist.init_process_group(backend, rank=0, world_size=1)
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        emit({"key": "ddp_heads", "backend": backend, "error": f"init_process_group: {type(e).__name__}: {e}"})
        return 1
    try:
        for kind in ("guided", "latent"):
            info = {"key": f"ddp_heads:{kind}", "backend": backend}
            try:
                head = _small_head(kind).to(device)
                size, batch = (16, 4) if kind == "guided" else (64, 4)
                generator = torch.Generator().manual_seed(1)
                image = torch.randn(batch, 1, size, size, generator=generator).to(device)
                labels = torch.randint(0, 3, (batch, 1, size, size), generator=generator).to(device)
                if kind == "latent":  # all_reduce of the latent moments over the process group
                    info["mask_latent_scale"] = round(head.calibrate_mask_latent_scale([labels]), 5)
                model = DistributedDataParallel(head, device_ids=[0] if cuda else None)
                params = [p for p in model.parameters() if p.requires_grad]
                optimizer = torch.optim.SGD(params, 0.05, momentum=0.9)
                model.train()
                losses = []
                start = time.perf_counter()
                for _ in range(3):
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                        loss = model(image, labels)["loss"]
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 12)
                    optimizer.step()
                    losses.append(round(float(loss), 5))
                _sync(cuda)
                info.update(losses=losses, seconds=round(time.perf_counter() - start, 3),
                            finite=all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
                            grads_synced=all(p.grad is not None for p in params))
                if not info["finite"]:
                    info["error"] = f"non-finite loss {losses}"
            except BaseException as e:  # noqa: BLE001
                traceback.print_exc()
                info["error"] = f"{type(e).__name__}: {e}"
            worst = max(worst, 1 if "error" in info else 0)
            emit(info)
    finally:
        dist.destroy_process_group()
    return worst


def child_main(step: str, argv: list) -> int:
    if step == "prepare":
        return child_prepare(*map(int, argv))
    return {"train": child_train, "predict": child_predict, "throughput": child_throughput,
            "ddp_heads": child_ddp_heads}[step](argv)


# ====================================================================== parent side
class Check:
    def __init__(self, args, work: Path, out_dir: Path):
        self.args, self.work, self.out_dir = args, work, out_dir
        self.start = time.time()
        self.deadline = self.start + args.budget_s
        self.log = out_dir / "gpu_check_log.txt"
        self.log.write_text("")
        self.results: dict = {}  # key -> the child's result
        self.steps: dict = {}  # step -> status, wall time, error
        self.meta = {"device": args.device, "tiny": args.tiny, "size": args.size, "num_train": args.num_train,
                     "num_test": args.num_test, "iters": args.iters, "sd_iters": args.sd_iters,
                     "budget_s": args.budget_s, "work_dir": str(work), "dataset_id": DATASET_ID,
                     "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def env(self, extra: Optional[dict] = None) -> dict:
        env = dict(os.environ)
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env[name] = str(self.work / name)
        cuda = self.args.device == "cuda"
        env.setdefault("nnUNet_n_proc_DA", str(min(8, max(1, (os.cpu_count() or 2) // 2))) if cuda else "0")
        env.setdefault("nnUNet_def_n_proc", "2")  # export / final-validation worker processes
        env["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded; fail fast instead of retrying
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def elapsed(self) -> float:
        return time.time() - self.start

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)

    def run(self, step: str, child_args: list, timeout: float, env: Optional[dict] = None,
            min_needed: float = 20, command: Optional[list] = None) -> Optional[list]:
        """One child process; its results (MARK lines) or None. Recorded under ``step`` whatever happens."""
        remaining = self.deadline - time.time()
        if remaining < min_needed:
            self.steps[step] = {"status": "skipped (budget)", "remaining_s": round(remaining, 1)}
            self.say(f"{step}: skipped, {remaining:.0f} s of the budget left")
            self.save()
            return None
        limit = max(1.0, min(timeout, remaining))
        cmd = command or [sys.executable, str(HERE), "--_child", step.split(":")[0], *map(str, child_args)]
        self.say(f"{step}: starting (timeout {limit:.0f} s)")
        log_file = self.work / "logs" / (re.sub(r"[^A-Za-z0-9_.-]", "_", step) + ".log")
        log_file.parent.mkdir(exist_ok=True)
        started = time.perf_counter()
        with open(log_file, "w") as out:
            proc = subprocess.Popen(cmd, cwd=self.work, env=self.env(env), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out, rc = True, None
            try:  # the child's own children too (data augmentation workers, export pools)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        wall = time.perf_counter() - started
        text = log_file.read_text(errors="replace")
        with open(self.log, "a") as f:
            f.write(f"\n{'=' * 30} {step} ({' '.join(map(str, cmd[1:]))}) rc={rc} wall={wall:.1f}s\n{text}")
        results = []
        for line in text.splitlines():
            if line.startswith(MARK):
                try:
                    results.append(json.loads(line[len(MARK):]))
                except json.JSONDecodeError:
                    pass
        for r in results:
            self.results[r["key"]] = r
        errors = [f"{r['key']}: {r['error']}" for r in results if r.get("error")]
        status = "timeout" if timed_out else "ok" if rc == 0 else f"failed (exit {rc})"
        record = {"status": status, "wall_s": round(wall, 1), "timeout_s": round(limit), "rc": rc,
                  "epoch_time_s": [float(m) for m in re.findall(r"Epoch time: ([\d.]+) s", text)],
                  "compile_logged": "Using torch.compile" in text, "log_file": str(log_file),
                  "train_loss": ([m for m in re.findall(r"train_loss (\S+)", text)] or [None])[-1]}
        if status != "ok":
            tail = "\n".join(l for l in text.splitlines() if not l.startswith(MARK))[-2500:]
            record["error"] = "; ".join(errors) or tail
            record["log_tail"] = tail
        self.steps[step] = record
        self.say(f"{step}: {status} in {wall:.1f} s" + (f" -- {record['error'][-300:]}" if status != "ok" else ""))
        self.save()
        return results

    # ---------------------------------------------------------------- output
    def save(self) -> None:
        self.meta["total_s"] = round(self.elapsed(), 1)
        data = {"meta": self.meta, "steps": self.steps, "results": self.results}
        (self.out_dir / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str))
        (self.out_dir / "gpu_check.md").write_text(self.markdown())

    def _status(self, step: str, key: Optional[str] = None) -> str:
        """ok, or what went wrong, short enough for a table cell."""
        def short(text: str) -> str:
            lines = [l for l in str(text).splitlines() if "warn" not in l.lower()]  # the last real lines
            return " ".join(" ".join(lines).split())[-200:].replace("|", "/")
        r = self.results.get(key) if key else None
        if r is not None and r.get("error"):
            return "error: " + short(r["error"])
        s = self.steps.get(step)
        if s is None:
            return "not run"
        if s["status"].startswith("skipped"):
            return s["status"]
        if s.get("diagnosis"):
            return f"{s['status']}: {s['diagnosis']}"
        tail = s.get("log_tail", "")
        if r is not None and r.get("exit_code"):
            return f"failed (exit {r['exit_code']}): " + short(tail)
        if s["status"] != "ok":
            partial = " (the columns: what it reported before)" if r is not None and r.get("partial") else ""
            return s["status"] + partial + (": " + short(tail) if tail else "")
        if key is not None and r is None:
            return "no result"
        return "ok"

    def markdown(self) -> str:
        cuda = self.args.device == "cuda"
        env = self.results.get("prepare", {}).get("env", {})
        prep = self.results.get("prepare", {})
        fmt = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines = [f"# nndiffseg GPU check ({'CUDA' if cuda else 'CPU dry run'})", "",
                 f"{env.get('gpu') or 'CPU'}; torch {env.get('torch')} (CUDA {env.get('cuda')}), Python "
                 f"{env.get('python')}, nnunetv2 {env.get('nnunetv2')}, diffusers {env.get('diffusers')}, open_clip "
                 f"{env.get('open_clip_torch')}, SimpleITK {env.get('SimpleITK')}; {env.get('cpu_count')} CPU cores. "
                 f"Synthetic dermoscopy {self.args.size}x{self.args.size} RGB, {self.args.num_train} training / "
                 f"{self.args.num_test} test cases, plans nnDiffSegPlans 2d: patch {prep.get('patch_size')}, batch "
                 f"{prep.get('batch_size')}. Total {self.elapsed():.0f} s (budget {self.args.budget_s:.0f} s).", "",
                 "## Training (`nnDiffSeg_train ID 2d 0 -tr NAME --num_epochs 1 --iters_per_epoch N`)", "",
                 "| trainer | status | compiled | batch | iters | s / iter | x nnUNet | first iter s | epoch s / iter "
                 "| peak GPU MiB | train loss | final val s | process s |",
                 "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        keys = [f"train:{t}" for t in TRAINERS] + [COMPILE]
        base = self.results.get(keys[0], {}).get("s_per_iter")
        for key in keys:
            r, s = self.results.get(key, {}), self.steps.get(key, {})
            spi = r.get("s_per_iter")
            epoch = s.get("epoch_time_s") or []
            compiled = CPU_SKIP if not cuda else ("yes" if r.get("compiled") else "no" if r.get("compiled") is False
                                                   else "-")
            name = key[len("train:"):].replace("@compile", " (nnUNet_compile=true, fold 3)")
            lines.append(
                f"| {name} | {self._status(key, key)} | {compiled} | "
                f"{fmt(r.get('batch_size'))} | {fmt(r.get('iterations'))} | {fmt(spi, 4)} | "
                f"{fmt(spi / base, 2) if spi and base else '-'} | {fmt(r.get('first_iter_s'), 2)} | "
                f"{fmt(epoch[-1] / r['iterations'], 3) if epoch and r.get('iterations') else '-'} | "
                f"{fmt(r.get('peak_train_mib'), 0) if cuda else CPU_SKIP} | {fmt(s.get('train_loss'))} | "
                f"{fmt(r.get('final_validation_s'), 1)} | {fmt(s.get('wall_s'), 1)} |")
        lines += ["", f"s / iter: median wall time of the trainer's train_step (batch to the device, forward, backward, "
                      f"optimizer step; CUDA-synchronised before and after; data loading not included) over the iterations after the "
                      f"first {WARMUP_ITERS}. First iter: the first train_step (cuDNN autotuning, torch.compile). "
                      f"Epoch s / iter: nnU-Net's 'Epoch time' / training iterations (warm-up, data loading and the "
                      f"epoch's validation iterations included). Peak: torch.cuda.max_memory_allocated over the "
                      f"training loop. Train loss: nnU-Net's epoch mean as logged (a NaN here is worth a look). Process s: the whole child process (imports, start-up, "
                      f"training, checkpoint, nnU-Net's final validation). All rows but the last run with "
                      f"nnUNet_compile={'true' if self.args.compile_diffusion else 'false'}, the last (run last, "
                      f"with what is left of the budget, on CUDA only) with nnUNet_compile=true, with which nnU-Net "
                      f"compiles the network (and its Dice loss); on a timeout its columns are those emitted before "
                      f"it was stopped. x nnUNet: against the uncompiled nnUNetTrainer. Latent_sd: random weights, random "
                      f"mask autoencoder (no MaskVAE_sd run).", "",
                  "## Prediction (`nnDiffSeg_predict -i imagesTs ... -f 0 --disable_tta -nps 0`)", "",
                  "| trainer | status | images | network s / image | x nnUNet | predictor call s / image | x nnUNet "
                  "| loop s / image | x nnUNet | first image s | peak GPU MiB |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        pbase = self.results.get("predict:nnUNetTrainer", {})
        for trainer in PREDICTORS:
            r = self.results.get(f"predict:{trainer}", {})
            cells = []
            for key in ("window_s_per_image", "call_s_per_image", "loop_s_per_image"):
                v, b = r.get(key), pbase.get(key)
                cells += [fmt(v, 4), fmt(v / b, 2) if v and b else "-"]
            images = fmt(r.get("images")) + ("" if r.get("written") in (None, r.get("images"))
                                             else f" ({r.get('written')} written)")
            lines.append(f"| {trainer} | {self._status('predict', f'predict:{trainer}')} | {images} | "
                         f"{' | '.join(cells)} | {fmt(r.get('first_image_s'), 3)} | "
                         f"{fmt(r.get('peak_mib'), 0) if cuda else CPU_SKIP} |")
        lines += ["", "Per image, medians over the test images after the first (time of nnU-Net's predictor inside "
                      "the real nnDiffSeg_predict run, CUDA-synchronised): network = "
                      "predict_sliding_window_return_logits (the network over the sliding window: one patch per "
                      "image here); predictor call = predict_logits_from_preprocessed_data (adds nnU-Net's "
                      "load_state_dict of the fold's weights, done for every image, and the copy to the CPU); "
                      "loop = wall time of nnDiffSeg_predict's whole loop (read, preprocess, predict, export in "
                      "this process with -nps 0) / images, the first image included. nnUNet_compile=false for all.",
                  "", f"## Latent single step, images / s ({'autocast, ' if cuda else ''}torch.inference_mode, "
                      f"LatentSegmenter built directly, eval mode)", "",
                  "| preset | dtype | batch | input | parameters (M) | images / s | ms / batch | first call s | "
                  "peak GPU MiB | status |", "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        rows = [r for k, r in self.results.items() if k.startswith("throughput:")]
        for r in rows:
            lines.append(f"| {r.get('preset', r['key'].split(':')[1])} | {r.get('dtype', '-')} | {fmt(r.get('batch'))} | "
                         f"3x{r.get('size', '-')}x{r.get('size', '-')} | {fmt(r.get('parameters_m'), 1)} | "
                         f"{fmt(r.get('images_per_s'), 1)} | {fmt(r.get('ms_per_batch'), 2)} | "
                         f"{fmt(r.get('first_call_s'), 2)} | {fmt(r.get('peak_mib'), 0) if cuda else CPU_SKIP} | "
                         f"{'error: ' + r['error'][:120] if r.get('error') else 'ok'} |")
        if not rows:
            lines.append(f"| - | - | - | - | - | - | - | - | - | {self._status('throughput')} |")
        lines += ["", f"Timed: {self.args.tp_iters} calls after 1 + 2 warm-up calls, CUDA-synchronised; "
                      f"a call = image encoder, one denoiser call at the last timestep, mask decoder.", "",
                  "## DDP", "", "| check | backend | status | detail |", "| --- | --- | --- | --- |"]
        for kind in ("guided", "latent"):
            r = self.results.get(f"ddp_heads:{kind}", {})
            lines.append(f"| small {kind} head in DistributedDataParallel, world size 1, 3 steps | "
                         f"{r.get('backend', '-')} | {self._status('ddp_heads', f'ddp_heads:{kind}')} | "
                         f"losses {r.get('losses', '-')} |")
        if not cuda:
            lines.append(f"| the same with nccl | nccl | {CPU_SKIP} | |")
        r, s = self.results.get(DDP1, {}), self.steps.get(DDP1, {})
        lines.append(f"| nnDiffSeg_train 2d 1 -tr nnDiffSegTrainerGuided -num_gpus 2, run as rank 0 of a world of "
                     f"1 | {r.get('backend', '-')} | {self._status(DDP1, DDP1)} "
                     f"| DDP wrapper {r.get('ddp', '-')}, world size {r.get('world_size', '-')}, "
                     f"{r.get('iterations', '-')} iterations, {fmt(r.get('s_per_iter'), 4)} s / iter, "
                     f"ranks agree logged: {s.get('ranks_agree', '-')} |")
        s = self.steps.get("ddp_cpu_gloo")
        lines.append(f"| nnDiffSeg_train 2d 2 -tr nnDiffSegTrainerGuided -device cpu -num_gpus 2 | gloo | "
                     f"{'not run (--cpu_ddp)' if s is None else self._status('ddp_cpu_gloo')} | "
                     f"{'' if s is None else 'ranks agree logged: ' + str(s.get('ranks_agree'))} |")
        lines += ["", "Failures and their log tails: gpu_check.json (steps), full child output: gpu_check_log.txt.", ""]
        return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        return child_main(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="dry-run sizes: 64x64, 6 training / 3 test cases, 2 iterations, batch 2 throughput")
    parser.add_argument("--out_dir", default="benchmark_output/gpu_check")
    parser.add_argument("--work_dir", default=None, help="scratch folder, must be new or empty (default: a temp dir)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 256; --tiny 64)")
    parser.add_argument("--num_train", type=int, default=None, help="training cases (default 12; --tiny 6)")
    parser.add_argument("--num_test", type=int, default=None, help="test cases (default 8; --tiny 3)")
    parser.add_argument("--iters", type=int, default=None, help="training iterations (default 20; --tiny 2)")
    parser.add_argument("--sd_iters", type=int, default=None, help="Latent_sd iterations (default 10; --tiny 1)")
    parser.add_argument("--tp_batch", type=int, default=None, help="throughput batch (default 32; --tiny 2)")
    parser.add_argument("--tp_iters", type=int, default=None, help="timed throughput calls (default 10; --tiny 1)")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="stop starting steps once this is spent (default 420 on cuda, 1500 on cpu)")
    parser.add_argument("--compile_diffusion", action="store_true",
                        help="nnUNet_compile=true for the fold-0 rows too (the diffusion trainers compile, and so does "
                             "nnUNetTrainer; compile time counts)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=TRAINERS + ["predict", "throughput", "ddp_heads", "ddp1", "compile"],
                        help="steps to leave out (a trainer left out is not predicted either)")
    parser.add_argument("--cpu_ddp", action="store_true",
                        help="also run the 2-process gloo DDP training on the CPU (nnDiffSeg_train ... -device cpu "
                             "-num_gpus 2, fold 2)")
    parser.add_argument("--keep_work", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = dict(size=(64, 256), num_train=(6, 12), num_test=(3, 8), iters=(2, 20), sd_iters=(1, 10),
                    tp_batch=(2, 32), tp_iters=(1, 10))
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    if args.budget_s is None:
        args.budget_s = 420.0 if args.device == "cuda" else 1500.0
    cuda = args.device == "cuda"
    cpu_ddp = args.cpu_ddp

    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="nndiffseg_gpu_check_"))
    if work.exists() and any(work.iterdir()):
        sys.exit(f"ERROR: {work} is not empty; give a new --work_dir")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / name).mkdir(parents=True, exist_ok=True)
    check = Check(args, work, out_dir)
    check.say(f"work folder {work}, results to {out_dir}")
    dev = args.device
    no_compile = {"nnUNet_compile": "true" if args.compile_diffusion else "false"}
    step_timeout = lambda gpu, cpu: gpu if cuda else cpu  # noqa: E731

    try:
        check.run("prepare", [args.size, args.num_train, args.num_test], step_timeout(120, 400))
        prepared = check.results.get("prepare", {}).get("exit_code") == 0
        if not prepared:
            check.say("preparation failed: nothing else can run")
            return 1
        dataset = Path(check.results["prepare"]["dataset"])

        for trainer in TRAINERS:
            if trainer in args.skip:
                check.steps[f"train:{trainer}"] = {"status": "skipped (--skip)"}
                continue
            iters = args.sd_iters if trainer.endswith("_sd") else args.iters
            check.run(f"train:{trainer}", ["-", DATASET_ID, "2d", 0, "-tr", trainer, "-device", dev, "--num_epochs", 1,
                                           "--iters_per_epoch", iters, *trainer_options(trainer)],
                      step_timeout(150, 400), env=no_compile, min_needed=40)

        trained = [t for t in PREDICTORS if checkpoint(work, dataset.name, t, 0)]
        if "predict" in args.skip:
            check.steps["predict"] = {"status": "skipped (--skip)"}
        elif trained:
            check.run("predict", [dev, dataset / "imagesTs", work / "predictions", *trained],
                      step_timeout(40 + 30 * len(trained), 200 * len(trained)), env={"nnUNet_compile": "false"},
                      min_needed=60)
        for t in PREDICTORS:
            if t not in trained and "predict" not in args.skip:
                check.results[f"predict:{t}"] = {"key": f"predict:{t}", "error": "no checkpoint_final.pth (training "
                                                                                    "failed or was skipped)"}
        if "throughput" in args.skip:
            check.steps["throughput"] = {"status": "skipped (--skip)"}
        else:
            check.run("throughput", [dev, args.tp_batch, args.size, args.tp_iters, "compact", "sd"],
                      step_timeout(90, 300), min_needed=30)
        if "ddp_heads" in args.skip:
            check.steps["ddp_heads"] = {"status": "skipped (--skip)"}
        else:
            check.run("ddp_heads", [dev], step_timeout(60, 200))
        if "ddp1" in args.skip:
            check.steps[DDP1] = {"status": "skipped (--skip)"}
        else:
            check.run(DDP1, ["ddp1", DATASET_ID, "2d", 1, "-tr", "nnDiffSegTrainerGuided", "-device", dev, "-num_gpus",
                             2, "--num_epochs", 1, "--iters_per_epoch", args.iters, "--clip_model", "random"],
                      step_timeout(120, 400), env=no_compile, min_needed=45)
            check.steps[DDP1]["ranks_agree"] = ranks_agree(work, dataset.name, 1)
            diagnose_ddp(check.steps[DDP1], work)
            check.save()
        if cpu_ddp:
            env = {"nnUNet_compile": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   "nnUNet_n_proc_DA": "0" if not cuda else check.env()["nnUNet_n_proc_DA"]}
            check.run("ddp_cpu_gloo", [], step_timeout(150, 300), env=env, min_needed=step_timeout(120, 60),
                      command=[sys.executable, "-m", "nndiffseg.run.train", str(DATASET_ID), "2d", "2", "-tr",
                               "nnDiffSegTrainerGuided", "-device", "cpu", "-num_gpus", "2", "--num_epochs", "1",
                               "--iters_per_epoch", "2", "--clip_model", "random"])
            check.steps["ddp_cpu_gloo"]["ranks_agree"] = ranks_agree(work, dataset.name, 2)
            diagnose_ddp(check.steps["ddp_cpu_gloo"], work)
            check.save()
        # last, with what is left of the budget: torch.compile takes minutes of its own (fold 3: fold 0's
        # uncompiled baseline stays for the prediction ratios)
        if not cuda:
            check.steps[COMPILE] = {"status": CPU_SKIP}
        elif "compile" in args.skip:
            check.steps[COMPILE] = {"status": "skipped (--skip)"}
        else:
            check.run(COMPILE, ["compile", DATASET_ID, "2d", 3, "-tr", "nnUNetTrainer", "-device", dev,
                                "--num_epochs", 1, "--iters_per_epoch", args.iters], 600,
                      env={"nnUNet_compile": "true"}, min_needed=60)
    finally:
        check.meta["total_s"] = round(check.elapsed(), 1)
        check.save()
        if not args.keep_work and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    check.say(f"done in {check.elapsed():.0f} s: {out_dir / 'gpu_check.json'}, {out_dir / 'gpu_check.md'}")
    print()
    print(check.markdown())
    return 0


def checkpoint(work: Path, dataset_name: str, trainer: str, fold: int) -> bool:
    return (work / "nnUNet_results" / dataset_name / f"{trainer}__nnDiffSegPlans__2d" / f"fold_{fold}" /
            "checkpoint_final.pth").is_file()


def diagnose_ddp(step: dict, work: Path) -> None:
    """A DDP run that trained but never finished nnU-Net's final validation: say so (seen on gloo with 2 ranks
    and an odd number of validation cases: the rank without a case waits in dist.barrier while the other's
    forward through the DDP wrapper waits for the buffer broadcast)."""
    if step.get("status") == "ok":
        return
    log = Path(step.get("log_file", ""))
    text = log.read_text(errors="replace") if log.is_file() else step.get("log_tail", "")
    if "Training done." in text and "Validation complete" not in text:
        step["diagnosis"] = ("training finished, then hung in nnU-Net's final validation (perform_actual_validation "
                             "predicts through the DDP wrapper; see log_tail)")


def ranks_agree(work: Path, dataset_name: str, fold: int) -> Optional[bool]:
    """Whether the DDP run logged nndiffseg's check that every rank holds the same weights."""
    folder = work / "nnUNet_results" / dataset_name / "nnDiffSegTrainerGuided__nnDiffSegPlans__2d" / f"fold_{fold}"
    logs = sorted(folder.glob("training_log_*.txt"))
    if not logs:
        return None
    return any("parameters and buffers identical" in log.read_text(errors="replace") for log in logs)


if __name__ == "__main__":
    sys.exit(main())
