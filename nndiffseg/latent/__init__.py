"""Single-step latent diffusion segmentation (SDSeg / SDMC-Seg style): autoencoders, denoiser, and the
model that ties them together. No nnU-Net imports here; the nnU-Net glue lives in nndiffseg.trainers."""
