"""Guided iterative diffusion segmentation (GuidedDiff / MedSegDiff style): a conditional DDPM over the
mask, guided by a segmentation network's class probabilities and CLIP text embeddings of the classes,
with several samples fused (mean or STAPLE) and their spread as uncertainty. No nnU-Net imports here; the
nnU-Net glue lives in nndiffseg.trainers."""
