"""nnDiffSegPlanner: nnU-Net's default planner, with 2D patch sizes that tile evenly into a KL-f8 latent
and a latent denoiser.

Each 2D patch edge is a multiple of ``PATCH_MULTIPLE = 8 * 2**k`` with ``k = 3``: the KL-f8 autoencoder
divides the patch by 8, and the latent denoiser halves that grid k = 3 more times (a 256 px patch gives a
32 px latent and a 4 px bottleneck). 3D configurations are planned exactly as nnU-Net plans them: the
diffusion heads are 2D.
"""
from typing import List, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

from nndiffseg.planning import PLANS_NAME

LATENT_DOWNSAMPLING = 8
DENOISER_DOWNSAMPLINGS = 3
PATCH_MULTIPLE = LATENT_DOWNSAMPLING * 2 ** DENOISER_DOWNSAMPLINGS


def round_up_to_multiple(shape: Union[List[int], Tuple[int, ...]], multiple: int = PATCH_MULTIPLE) -> List[int]:
    return [int(np.ceil(s / multiple) * multiple) for s in shape]


class nnDiffSegPlanner(ExperimentPlanner):
    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = PLANS_NAME,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if len(spacing) == 2 and any(s % PATCH_MULTIPLE for s in plan["patch_size"]):
            self._grow_patch_to_latent_grid(plan, spacing, approximate_n_voxels_dataset)
        return plan

    def _grow_patch_to_latent_grid(self, plan: dict, spacing, approximate_n_voxels_dataset: float) -> None:
        """Round the patch up (never down: the image context nnU-Net chose is kept) and rebuild the U-Net
        topology for the new size."""
        _, pool_op_kernel_sizes, conv_kernel_sizes, patch_size, _ = get_pool_and_conv_props(
            spacing, round_up_to_multiple(plan["patch_size"]), self.UNet_featuremap_min_edge_length, 999999)
        patch_size = round_up_to_multiple(patch_size)  # the topology may pad it to a coarser grid, still aligned
        num_stages = len(pool_op_kernel_sizes)
        plan["patch_size"] = patch_size
        plan["architecture"]["arch_kwargs"].update({
            "n_stages": num_stages,
            "features_per_stage": [min(self.UNet_max_features_2d, self.UNet_base_num_features * 2 ** i)
                                   for i in range(num_stages)],
            "kernel_sizes": conv_kernel_sizes,
            "strides": pool_op_kernel_sizes,
            "n_conv_per_stage": self.UNet_blocks_per_stage_encoder[:num_stages],
            "n_conv_per_stage_decoder": self.UNet_blocks_per_stage_decoder[:num_stages - 1],
        })
        # the larger patch covers more of the dataset per batch: re-apply nnU-Net's 5 % cap
        patch_voxels = np.prod(patch_size, dtype=np.float64)
        max_batch = round(approximate_n_voxels_dataset * self.max_dataset_covered / patch_voxels)
        plan["batch_size"] = max(min(plan["batch_size"], max_batch), self.UNet_min_batch_size)
