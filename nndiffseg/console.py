"""The console scripts: each imports its tool only when it runs, so Ctrl-C while torch and nnU-Net load (several
seconds) ends as it does once the tool runs (``nndiffseg.errors.run_cli``): "Interrupted.", status 130, no
traceback."""
import importlib
import sys

# console script -> "module:function" of the tool
TOOLS = {
    "nnDiffSeg_plan_and_preprocess": "nndiffseg.planning.plan_and_preprocess:plan_and_preprocess_entry",
    "nnDiffSeg_train": "nndiffseg.run.train:train_entry",
    "nnDiffSeg_predict": "nndiffseg.inference.predict:predict_entry",
    "nnDiffSeg_evaluate": "nndiffseg.evaluation.evaluate:evaluate_entry",
    "nnDiffSeg_find_best_configuration": "nndiffseg.evaluation.find_best_configuration:find_best_configuration_entry",
    "nnDiffSeg_ensemble": "nndiffseg.inference.ensemble:ensemble_entry",
    "nnDiffSeg_apply_postprocessing": "nndiffseg.inference.postprocessing:apply_postprocessing_entry",
    "nnDiffSeg_convert_isic": "nndiffseg.dataset_conversion.isic:convert_isic_entry",
    "nnDiffSeg_convert_stroke2021": "nndiffseg.dataset_conversion.stroke2021:convert_stroke2021_entry",
    "nnDiffSeg_convert_multirater": "nndiffseg.dataset_conversion.multirater:convert_multirater_entry",
    "nnDiffSeg_demo": "nndiffseg.demo.run_demo:demo_entry",
    "nnDiffSeg_ext_trainer_dir": "nndiffseg.ext_trainer:print_ext_trainer_dir_entry",
}


def load_tool(tool: str):
    """The entry function of the console script ``tool``; exits with status 130 on Ctrl-C while importing."""
    module, function = TOOLS[tool].split(":")
    try:
        return getattr(importlib.import_module(module), function)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)


def _script(tool: str):
    def run() -> None:
        load_tool(tool)()
    run.__doc__ = f"The {tool} console script."
    return run


plan_and_preprocess = _script("nnDiffSeg_plan_and_preprocess")
train = _script("nnDiffSeg_train")
predict = _script("nnDiffSeg_predict")
evaluate = _script("nnDiffSeg_evaluate")
find_best_configuration = _script("nnDiffSeg_find_best_configuration")
ensemble = _script("nnDiffSeg_ensemble")
apply_postprocessing = _script("nnDiffSeg_apply_postprocessing")
convert_isic = _script("nnDiffSeg_convert_isic")
convert_stroke2021 = _script("nnDiffSeg_convert_stroke2021")
convert_multirater = _script("nnDiffSeg_convert_multirater")
demo = _script("nnDiffSeg_demo")
ext_trainer_dir = _script("nnDiffSeg_ext_trainer_dir")
