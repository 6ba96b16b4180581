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
    "nnDiffSeg_calibrate": "nndiffseg.evaluation.calibrate:calibrate_entry",
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


def __getattr__(name: str):
    """``nndiffseg.console.NAME`` is the console script nnDiffSeg_NAME (setup.py's entry points name them so)."""
    tool = f"nnDiffSeg_{name}"
    if tool not in TOOLS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def run() -> None:
        load_tool(tool)()
    run.__doc__ = f"The {tool} console script."
    return run
