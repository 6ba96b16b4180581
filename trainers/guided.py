"""nnU-Net adapter for the guided iterative diffusion method (GuidedDiff / MedSegDiff style); the method
itself is ``nndiffseg.guided.segmenter.GuidedSegmenter``.

The spatial prior is the U-Net nnU-Net planned for the configuration, trained jointly with nnU-Net's own
Dice + CE loss (deep supervision included) as an auxiliary term of weight 10 (GuidedDiff's), or started
from a finished nnU-Net fold (``--prior CHECKPOINT``) and then fine-tuned, or frozen with
``--freeze_prior``. The semantic prior is CLIP's embedding of one prompt per class, computed once at the
start of training and saved in the checkpoint, so prediction loads no CLIP.
``nnDiffSegTrainerGuided`` attends to the text (cross-attention); ``nnDiffSegTrainerGuided_time`` adds it to
the timestep embedding (GuidedDiff's way).
"""
from typing import Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nndiffseg.checkpoints import read_network_weights
from nndiffseg.errors import NnDiffSegError
from nndiffseg.guided.denoiser import build_denoiser
from nndiffseg.guided.segmenter import GuidedSegmenter
from nndiffseg.guided.text_prior import check_clip_model, class_prompts, embed_prompts, load_prompts_file
from nndiffseg.options import Option
from nndiffseg.trainers.base import nnDiffSegHeadTrainer

# CLIP text features (512 for ViT-B, 768 for ViT-L, 1024 for ViT-H) are zero-padded to this size, so the
# network's shape does not depend on the CLIP model and nnU-Net's predictor can rebuild it from the plans alone
TEXT_DIM = 1024
DEFAULT_CLIP_MODEL = "ViT-B-32:openai"  # GuidedDiff's text encoder


class nnDiffSegTrainerGuided(nnDiffSegHeadTrainer):
    head_class = GuidedSegmenter
    # architecture (part of the trainer name, as nnU-Net's trainer variants are). Cross-attention: on the real
    # ISIC sample its mean Dice beat the timestep embedding's by 3.0 points at one DDIM step (0.842 against
    # 0.812), a lead within the noise of 14 cases (docs/benchmarks.md)
    conditioning = "cross_attention"
    denoiser_size = "small"
    training_options = nnDiffSegHeadTrainer.training_options + (
        Option("clip_model", f"guided trainers: CLIP text encoder for the class prompts, MODEL:PRETRAINED_TAG (default "
                             f"{DEFAULT_CLIP_MODEL}), MODEL:/path/to/weights, a local open_clip folder, or 'random'"),
        Option("prompts", "guided trainers: JSON file {label name: prompt} replacing the default prompts "
                          "('a medical image of NAME')"),
        Option("prior", "guided trainers: start the prior U-Net from this nnUNetTrainer checkpoint (same dataset, "
                        "plans and configuration); default: trained jointly from scratch"),
        Option("freeze_prior", "guided trainers: keep the --prior U-Net frozen", const=True))
    option_checks = {"clip_model": check_clip_model, "prompts": load_prompts_file}  # before any work
    # On a multi-rater dataset the samples must differ where the readers do. On the synthetic fixture (64 px, 4 raters,
    # a faint blob that 1 or 2 of them mark; docs/benchmarks.md, "Multi-rater") v prediction sampled by deterministic
    # DDIM over 10 steps had the lowest GED² of every setting tried at both rater fractions (0.033 and 0.038, against
    # 0.058-0.073 for x0 prediction at 1 or 10 steps); 16 samples per image is the size the field scores (GED16).
    multirater_settings = {"prediction_type": "v_prediction", "steps": 10, "num_samples": 16}
    checkpoint_options = {"prior": ("labels", "input channels", "patch size", "architecture")}
    mirroring_at_prediction = False  # 4x the cost in 2D for K samples x S steps

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.clip_model = DEFAULT_CLIP_MODEL
        self.prompts: Optional[str] = None
        self.prior: Optional[str] = None
        self.freeze_prior = False

    @classmethod
    def check_method_options(cls, options: dict) -> None:
        """Combinations refused before any work (nndiffseg.registry)."""
        if options.get("freeze_prior") and not options.get("prior"):
            raise NnDiffSegError("--freeze_prior needs --prior CHECKPOINT (a finished nnUNetTrainer fold of this "
                                 "dataset and plans): a frozen random prior guides nothing")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        prior = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                         num_output_channels, enable_deep_supervision)
        denoiser = build_denoiser(num_output_channels, num_input_channels, TEXT_DIM, cls.conditioning,
                                  cls.denoiser_size, configuration_manager.patch_size)
        return GuidedSegmenter(prior, denoiser, **cls.head_settings)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self.module.prior.decoder.deep_supervision = enabled

    def prepare_network(self, network: GuidedSegmenter) -> None:
        super().prepare_network(network)
        if self.freeze_prior:
            self.check_method_options({"freeze_prior": True, "prior": self.prior})
            network.freeze_prior()

    def after_initialize(self) -> None:
        self.module.set_nnunet_loss(self.loss)  # the prior's own loss

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.current_epoch == 0:  # a resumed run (--c) has the embeddings and the prior in its checkpoint
            self._embed_text()
            if self.prior is not None:
                self._load_prior(self.prior)

    def _embed_text(self) -> None:
        user_prompts = load_prompts_file(self.prompts) if self.prompts else None
        try:
            prompts = class_prompts(self.dataset_json["labels"], user_prompts)
        except ValueError as e:
            raise NnDiffSegError(f"{self.prompts or 'dataset.json labels'}: {e}") from None
        try:
            self.module.set_text_embeddings(embed_prompts(prompts, self.clip_model), self.clip_model, prompts)
        except ValueError as e:
            raise NnDiffSegError(f"--clip_model {self.clip_model}: {e}") from None
        self.print_to_log_file(f"class prompts embedded with CLIP {self.clip_model}: {prompts}")

    def _load_prior(self, checkpoint_file: str) -> None:
        weights, trainer_name = read_network_weights(checkpoint_file, "--prior")
        try:
            self.module.load_prior_state(weights)
        except ValueError as e:
            raise NnDiffSegError(f"--prior {checkpoint_file} does not fit this configuration's U-Net (train the "
                                 f"prior with -tr nnUNetTrainer on the same dataset, plans and configuration): "
                                 f"{e}") from None
        self.print_to_log_file(f"prior initialised from {checkpoint_file} ({trainer_name}), "
                               f"{'frozen' if self.freeze_prior else 'fine-tuned'}")


class nnDiffSegTrainerGuided_time(nnDiffSegTrainerGuided):
    """The class prompts are added to the timestep embedding, as GuidedDiff does, instead of attended to."""
    conditioning = "time"
