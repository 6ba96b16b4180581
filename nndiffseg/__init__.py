"""nndiffseg: diffusion-based segmentation heads brought into nnU-Net v2 as trainer classes."""
import os

__version__ = "0.1.0"

# nnU-Net reads nnUNet_def_n_proc when first imported and otherwise spawns 8 worker processes (each
# importing torch) for validation and export, whatever the machine; cap the default at the CPU count.
os.environ.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
