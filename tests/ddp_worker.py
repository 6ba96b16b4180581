"""Training steps of a head under DistributedDataParallel on gloo (CPU), or in one process on the whole batch:
the loop of nnDiffSegHeadTrainer.train_step (loss from the network's forward, gradient clipping) with SGD
instead of AdamW: Adam turns the rounding noise of gradients that are zero in theory (biases just before a
GroupNorm of one channel per group) into full-size steps, which would hide what is compared here."""
import os

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nndiffseg.guided.denoiser import build_denoiser as build_guided_denoiser
from nndiffseg.guided.segmenter import GuidedSegmenter
from nndiffseg.latent.autoencoders import build_denoiser as build_latent_denoiser
from nndiffseg.latent.segmenter import LatentSegmenter

STEPS, BATCH = 3, 4  # BATCH in all, split evenly over the ranks


def _autoencoder():
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1)


def build_head(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "guided":
        prior = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
        head = GuidedSegmenter(prior, build_guided_denoiser(3, 1, 16, "cross_attention", (8, 16)),
                               prediction_type="sample")
        head.set_nnunet_loss(lambda output, target: nn.functional.cross_entropy(output, target[:, 0].long()))
        return head
    return LatentSegmenter(_autoencoder(), _autoencoder(), build_latent_denoiser("compact"), 3, 1)


def batches(kind: str):
    """Every step's whole batch: images, labels, noise and timesteps, the same in every process."""
    generator = torch.Generator().manual_seed(1)
    noise_shape = (BATCH, 3, 16, 16) if kind == "guided" else (BATCH, 4, 32, 32)
    size = 16 if kind == "guided" else 64
    for _ in range(STEPS):
        yield (torch.randn(BATCH, 1, size, size, generator=generator),
               torch.randint(0, 3, (BATCH, 1, size, size), generator=generator),
               torch.randn(noise_shape, generator=generator),
               torch.randint(0, 1000, (BATCH,), generator=generator))


def train(network: nn.Module, kind: str, rank: int, world_size: int) -> None:
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, 0.05, momentum=0.9)
    share = BATCH // world_size
    mine = slice(rank * share, (rank + 1) * share)
    network.train()
    for image, labels, noise, timesteps in batches(kind):
        optimizer.zero_grad(set_to_none=True)
        loss = network(image[mine], labels[mine], noise=noise[mine], timesteps=timesteps[mine])["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 12)
        optimizer.step()


def run_rank(rank: int, world_size: int, kind: str, out_folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        head = build_head(kind)
        if kind == "latent":  # each rank sees only its own masks; the scale must be the global one
            labels = next(batches(kind))[1]
            share = BATCH // world_size
            head.calibrate_mask_latent_scale([labels[rank * share:(rank + 1) * share]])
        train(DDP(head), kind, rank, world_size)
        torch.save(head.state_dict(), os.path.join(out_folder, f"rank{rank}.pth"))
    finally:
        dist.destroy_process_group()


def run_single(kind: str) -> dict:
    head = build_head(kind)
    if kind == "latent":
        head.calibrate_mask_latent_scale([next(batches(kind))[1]])
    train(head, kind, 0, 1)
    return head.state_dict()
