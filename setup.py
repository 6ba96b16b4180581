from setuptools import find_packages, setup

# trainers/ and dataset_conversion/ sit at the repository root (design card) but install inside the
# nndiffseg namespace, so nothing generic lands at the top of site-packages.
_MAPPED = {"trainers": "nndiffseg.trainers", "dataset_conversion": "nndiffseg.dataset_conversion"}


def _packages() -> list:
    packages = find_packages(include=["nndiffseg", "nndiffseg.*"])
    for folder, name in _MAPPED.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(folder)]
    return packages


setup(
    name="nndiffseg",
    version="0.1.0",
    description="Diffusion-based medical image segmentation as nnU-Net v2 trainers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"nndiffseg": "nndiffseg", **{name: folder for folder, name in _MAPPED.items()}},
    install_requires=[
        "torch>=2.1.2,!=2.9.*",  # nnunetv2's range
        "nnunetv2>=2.8.1",
        "batchgenerators>=0.25.1",
        "SimpleITK>=2.2.1",
        "nibabel",  # nnDiffSeg_convert_multirater checks NIfTI files with it (also a dependency of nnunetv2)
        "open_clip_torch>=2.20",
        "diffusers>=0.27",
        "acvl-utils>=0.2.6",
        "numpy",
        "scipy",
        "Pillow",
        "tqdm",
        "matplotlib",
        "scikit-learn",  # AUROC in nnDiffSeg_evaluate (also a dependency of nnunetv2)
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3.6", "scikit-image", "ruff>=0.6"]},
    entry_points={
        "console_scripts": [
            "nnDiffSeg_plan_and_preprocess = nndiffseg.console:plan_and_preprocess",
            "nnDiffSeg_train = nndiffseg.console:train",
            "nnDiffSeg_predict = nndiffseg.console:predict",
            "nnDiffSeg_evaluate = nndiffseg.console:evaluate",
            "nnDiffSeg_calibrate = nndiffseg.console:calibrate",
            "nnDiffSeg_find_best_configuration = nndiffseg.console:find_best_configuration",
            "nnDiffSeg_ensemble = nndiffseg.console:ensemble",
            "nnDiffSeg_apply_postprocessing = nndiffseg.console:apply_postprocessing",
            "nnDiffSeg_convert_isic = nndiffseg.console:convert_isic",
            "nnDiffSeg_convert_stroke2021 = nndiffseg.console:convert_stroke2021",
            "nnDiffSeg_convert_multirater = nndiffseg.console:convert_multirater",
            "nnDiffSeg_demo = nndiffseg.console:demo",
            "nnDiffSeg_ext_trainer_dir = nndiffseg.console:ext_trainer_dir",
        ]
    },
)
