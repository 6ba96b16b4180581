"""The semantic prior: one text prompt per class, embedded once by a CLIP text encoder (open_clip).

The trainer embeds the prompts at the start of training and stores the (num_classes, D) tensor in the
checkpoint, so prediction never loads CLIP.

``clip_model`` says where the text encoder comes from:
- ``MODEL:TAG``, e.g. ``ViT-B-32:openai``: open_clip's pretrained weights (downloaded, or from its cache);
- ``MODEL:/path/to/weights``: that architecture with the weights in a local file (.bin/.pt/.safetensors);
- ``/path/to/folder`` or ``local-dir:/path/to/folder``: a folder laid out like an open_clip Hugging Face
  repository (``open_clip_config.json`` and ``open_clip_pytorch_model.bin``), e.g. a downloaded one;
- ``hf-hub:org/repo``: such a repository on the Hugging Face Hub;
- ``random``: a tiny text encoder with fixed random weights (tests, and runs without any CLIP weights).
Offline, huggingface_hub retries a download for about a minute before failing; HF_HUB_OFFLINE=1 makes a
tag load from the cache or fail at once.
"""
import json
from pathlib import Path
from typing import Optional

import torch

from nndiffseg.errors import NnDiffSegError

BACKGROUND_PROMPT = "a medical image of healthy background tissue"
CLASS_TEMPLATE = "a medical image of {name}"
RANDOM = "random"
RANDOM_SEED = 0
# CLIP's tokenizer (its full vocabulary) with a 2-layer, 64-wide text transformer; the vision tower only
# exists because open_clip's CLIP class needs one.
RANDOM_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_SCHEMAS = ("hf-hub:", "local-dir:")


def class_prompts(labels: dict, prompts: Optional[dict] = None) -> list[str]:
    """One prompt per class in label-value order, from a dataset.json ``labels`` dict (name -> value).
    ``prompts`` (label name -> text) replaces the default prompt of the classes it names. nnU-Net's
    ``ignore`` label is not a class the network predicts and gets no prompt."""
    regions = [name for name, value in labels.items() if isinstance(value, (list, tuple))]
    if regions:
        raise ValueError(f"region-based labels are unsupported by the guided diffusion heads "
                         f"(labels {', '.join(regions)} are lists of values)")
    classes = {name: value for name, value in labels.items() if name != "ignore"}
    values = list(classes.values())
    integers = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not integers or sorted(values) != list(range(len(values))):
        raise ValueError(f"labels must have the distinct integer values 0..{len(classes) - 1}, got {classes}")
    prompts = dict(prompts or {})
    unknown = sorted(set(prompts) - set(classes))
    if unknown:
        raise ValueError(f"prompts given for unknown labels: {', '.join(unknown)} "
                         f"(the labels are: {', '.join(classes)})")
    by_value = sorted(classes.items(), key=lambda item: item[1])
    return [prompts.get(name) or (BACKGROUND_PROMPT if value == 0 else
                                  CLASS_TEMPLATE.format(name=name.replace("_", " ")))
            for name, value in by_value]


def load_prompts_file(path) -> dict:
    """A user's prompts file: a JSON object mapping label names to prompt texts."""
    path = Path(path)
    if not path.is_file():
        raise NnDiffSegError(f"prompts file not found: {path}")
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NnDiffSegError(f"prompts file {path} is not valid JSON: {e}") from None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) and v.strip() for v in prompts.values()):
        raise NnDiffSegError(f"prompts file {path} must hold a JSON object mapping label names to non-empty "
                             f'prompt texts, e.g. {{"lesion": "a dermoscopy image of a skin lesion"}}')
    return prompts


def random_clip_model() -> torch.nn.Module:
    """The tiny text encoder behind ``clip_model="random"``: the same weights on every call."""
    import open_clip
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random stream
        torch.manual_seed(RANDOM_SEED)
        return open_clip.CLIP(**RANDOM_CLIP_CONFIG)


def _clip_source(clip_model: str) -> tuple[str, Optional[str], str]:
    """(model name for open_clip, its ``pretrained`` argument, a description) for a ``clip_model`` string."""
    import open_clip  # here, not at the top: every nnDiffSeg_ process imports this module, few load CLIP
    if clip_model.startswith(_SCHEMAS):
        return clip_model, None, f"'{clip_model}'"
    if Path(clip_model).is_dir():
        return f"local-dir:{clip_model}", None, f"the open_clip folder {clip_model}"
    if Path(clip_model).is_file():
        raise NnDiffSegError(f"--clip_model {clip_model} is a weights file without its architecture: give it as "
                             f"MODEL:{clip_model}, e.g. ViT-B-32:{clip_model}")
    if ":" not in clip_model:
        raise NnDiffSegError(f"--clip_model '{clip_model}' names no weights (nor an existing folder): give "
                             f"MODEL:PRETRAINED_TAG (e.g. ViT-B-32:openai), MODEL:/path/to/weights, a folder with "
                             f"open_clip_config.json, or 'random'")
    name, pretrained = clip_model.split(":", 1)
    if name.replace("/", "-") not in open_clip.list_models():
        raise NnDiffSegError(f"unknown open_clip model '{name}' in --clip_model {clip_model} "
                             f"(open_clip.list_models() lists them, e.g. ViT-B-32, ViT-B-16, RN50)")
    if Path(pretrained).is_file():
        return name, pretrained, f"open_clip model {name} with the weights in {pretrained}"
    if "/" in pretrained or Path(pretrained).suffix:
        raise NnDiffSegError(f"CLIP weights file not found: {pretrained} (from --clip_model {clip_model})")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise NnDiffSegError(f"open_clip has no pretrained tag '{pretrained}' for {name} (from --clip_model "
                             f"{clip_model}); its tags: {', '.join(tags) or 'none'}")
    return name, pretrained, f"open_clip model {name} with its pretrained tag '{pretrained}' (downloaded if not cached)"


def check_clip_model(clip_model: str) -> None:
    """A clear error for a ``clip_model`` string that cannot work, without loading (or downloading) anything."""
    if clip_model != RANDOM:
        _clip_source(clip_model)


def _load_clip(clip_model: str):
    """(model, tokenizer) for a ``clip_model`` string; see the module docstring."""
    import open_clip
    if clip_model == RANDOM:
        context_length = RANDOM_CLIP_CONFIG["text_cfg"]["context_length"]
        return random_clip_model(), open_clip.SimpleTokenizer(context_length=context_length)
    name, pretrained, tried = _clip_source(clip_model)
    try:
        return open_clip.create_model(name, pretrained=pretrained), open_clip.get_tokenizer(name)
    # any failure here (unknown model, no network, a corrupt or mismatched weights file) is a choice the user
    # must fix, whatever open_clip, huggingface_hub or torch.load raised
    except Exception as e:
        raise NnDiffSegError(
            f"could not load the CLIP text encoder --clip_model {clip_model} (tried {tried}): "
            f"{str(e).rstrip('.')}. Without network access give a local file as MODEL:/path/to/weights "
            f"(e.g. ViT-B-32:/data/open_clip_pytorch_model.bin) or a folder with open_clip_config.json and the "
            f"weights; --clip_model random uses a random text encoder") from e


def embed_prompts(prompts: list[str], clip_model: str) -> torch.Tensor:
    """(len(prompts), D) L2-normalised pooled CLIP text features, float32 on the CPU."""
    model, tokenizer = _load_clip(clip_model)
    model.eval()
    with torch.no_grad():
        features = model.encode_text(tokenizer(list(prompts)), normalize=True)
    return features.float().cpu()
