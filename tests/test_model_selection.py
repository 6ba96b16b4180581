"""nnU-Net's model-selection workflow with the diffusion trainers (issue 15): folds 0-2 of nnUNetTrainer,
nnDiffSegTrainerGuided and nnDiffSegTrainerLatent (1 epoch x 2 iterations each, --npz; the latent one with its
mask autoencoder stage in fold 0, which folds 1-2 take with --mask_vae), stock nnUNetv2_find_best_configuration
over nnUNetTrainer and the guided trainer and ours over all three, prediction folders of nnUNetTrainer and the
guided trainer ensembled by nnUNetv2_ensemble and nnDiffSeg_ensemble, and postprocessing. Selection and prediction
take the folds as -f 0 1 2 (nnU-Net's tools take that option too): the same code as the default five folds, in
three fifths of the time of what was the suite's longest module.

The folds train in one process (tests/cli.py run_batch, one import for all nine); what the short runs learn
does not matter here, only that every file nnU-Net's tools read is there and what they write is right."""
import json
import pickle

import numpy as np
import pytest
from cli import PLAN_QUICKLY, assert_refused, nnunet_folders, run_batch, run_tool
from PIL import Image
from scipy import ndimage
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

DATASET_ID = 71
TRAINERS = ("nnUNetTrainer", "nnDiffSegTrainerGuided")  # predicted, ensembled and postprocessed
SELECTED_FROM = (*TRAINERS, "nnDiffSegTrainerLatent")  # cross-validated and compared (its mask autoencoder stage too)
RUN = ["-device", "cpu", "--num_epochs", 1, "--iters_per_epoch", 2, "--npz"]
PLANS = "nnDiffSegPlans"
FOLDS = (0, 1, 2)  # of nnU-Net's 5-fold split of the 10 cases: 6 validation cases
FOLDS_NAME = "_".join(map(str, FOLDS))
RECORD = ["dataset.json", "nndiffseg_predict_args.json", "plans.json"]


@pytest.fixture(scope="module")
def folds(module_tmp):
    root = module_tmp("model_selection")
    env = nnunet_folders(root)
    raw = write_toy_dataset(root / "nnUNet_raw", DATASET_ID, num_train=10, num_test=2)
    commands = [("nnDiffSeg_plan_and_preprocess", ["-d", DATASET_ID, *PLAN_QUICKLY])]
    # the latent trainer runs its mask autoencoder stage in fold 0; the other folds take that one with --mask_vae
    stage = (root / "nnUNet_results" / raw.name / f"nnDiffSegTrainerMaskVAE__{PLANS}__2d" / "fold_0" /
             "checkpoint_final.pth")
    for trainer in SELECTED_FROM:
        for f in FOLDS:
            extra = ["--clip_model", "random"] if trainer == "nnDiffSegTrainerGuided" else \
                ["--mask_vae", stage] if trainer == "nnDiffSegTrainerLatent" and f > 0 else []
            commands.append(("nnDiffSeg_train", [DATASET_ID, "2d", f, "-tr", trainer, *RUN, *extra]))
    ran = run_batch(root, "folds", commands, env)
    for (tool, args), result in zip(commands, ran):
        assert result.returncode == 0, (tool, args, result.stderr[-3000:])
    results = root / "nnUNet_results" / raw.name
    return {"root": root, "env": env, "raw": raw, "results": results}


@pytest.mark.parametrize("trainer", SELECTED_FROM)
def test_every_fold_validates_as_nnunet_expects(folds, trainer):
    model = folds["results"] / f"{trainer}__{PLANS}__2d"
    assert (model / "plans.json").is_file() and (model / "dataset.json").is_file()
    for f in FOLDS:
        validation = model / f"fold_{f}" / "validation"
        summary = json.loads((validation / "summary.json").read_text())
        assert "Dice" in summary["foreground_mean"]
        cases = sorted(p.name[:-4] for p in validation.glob("*.png"))
        assert len(cases) == 2  # 10 cases in nnU-Net's 5 folds
        for case in cases:
            probabilities = np.load(validation / f"{case}.npz")["probabilities"]
            assert probabilities.shape[0] == 2  # background + 1
            np.testing.assert_allclose(probabilities.sum(0), 1, atol=1e-3)  # probabilities, not logits
            assert (validation / f"{case}.pkl").is_file()


@pytest.fixture(scope="module")
def selection(folds):
    """Stock find_best_configuration (nnUNet_extTrainer set as the README says), then ours."""
    from nndiffseg.ext_trainer import EXT_TRAINER_DIR
    args = [DATASET_ID, "-c", "2d", "-p", PLANS, "-np", 1, "-f", *FOLDS, "-tr"]
    # stock over two trainers only: it finds ours and picks among them (each nnU-Net evaluation it runs starts a
    # spawned worker of its own, about 4 s, so all three would double its time)
    stock = run_tool("nnUNetv2_find_best_configuration", *args, *TRAINERS,
                     env={**folds["env"], "nnUNet_extTrainer": EXT_TRAINER_DIR})
    stock_information = json.loads((folds["results"] / "inference_information.json").read_text())
    stock_instructions = (folds["results"] / "inference_instructions.txt").read_text()
    ours = run_tool("nnDiffSeg_find_best_configuration", *args, *SELECTED_FROM, env=folds["env"])
    return {"stock": stock, "stock_information": stock_information, "stock_instructions": stock_instructions,
            "ours": ours, "instructions": (folds["results"] / "inference_instructions.txt").read_text(),
            "information": json.loads((folds["results"] / "inference_information.json").read_text())}


def test_find_best_configuration_compares_every_trainer_and_every_pair(folds, selection):
    results = selection["information"]["all_results"]
    ensemble = f"ensemble___nnUNetTrainer__{PLANS}__2d___nnDiffSegTrainerGuided__{PLANS}__2d___{FOLDS_NAME}"
    models = [f"{t}__{PLANS}__2d" for t in SELECTED_FROM]
    ensembles = {f"ensemble___{a}___{b}___{FOLDS_NAME}" for i, a in enumerate(models) for b in models[i + 1:]}
    assert ensemble in ensembles and set(results) == set(models) | ensembles
    assert all(0 <= v <= 1 for v in results.values())
    assert "nnUNetv2_predict" in selection["stock_instructions"]
    assert set(selection["stock_information"]["all_results"]) == {*models[:2], ensemble}
    assert "***Run inference like this:***" in selection["ours"].stdout


def test_find_best_configuration_calibrates_every_model(folds, selection):
    """Each model's folds kept their validation probabilities (--npz), so each gets nnDiffSeg_calibrate's
    temperature, fitted on the selected folds."""
    for trainer in SELECTED_FROM:
        model = f"{trainer}__{PLANS}__2d"
        written = json.loads((folds["results"] / model / "calibration.json").read_text())
        assert 0.05 <= written["temperature"] <= 20
        assert set(written["temperature_per_fold"]) == {str(f) for f in FOLDS}
        assert f"{model}: temperature {written['temperature']:.3f} written" in selection["ours"].stdout


def test_our_instructions_name_our_tools(folds, selection):
    text = selection["instructions"]
    assert "nnDiffSeg_predict -d" in text and "nnDiffSeg_apply_postprocessing -i" in text
    assert "nnUNetv2_" not in text
    if "An ensemble won" in text:
        assert "nnDiffSeg_ensemble -i" in text


def test_crossval_summary_table_and_box_plot(folds, selection):
    table = (folds["results"] / "crossval_summary.md").read_text()
    rows = json.loads((folds["results"] / "crossval_summary.json").read_text())
    for trainer in SELECTED_FROM:
        row = rows[f"{trainer}__{PLANS}__2d"]
        fold_dice = [json.loads((folds["results"] / f"{trainer}__{PLANS}__2d" / f"fold_{f}" / "validation" /
                                 "summary.json").read_text())["foreground_mean"]["Dice"] for f in FOLDS]
        assert [row["folds"][str(f)] for f in FOLDS] == fold_dice
        assert row["mean_of_folds"] == pytest.approx(np.mean(fold_dice))
        assert len(row["case_dice"]) == 2 * len(FOLDS)
        assert f"| {trainer} (2d)" in table
    assert table.count("(selected)") == 1
    assert "| ECE | Brier | pixel AUROC | case Spearman | AURC |" in table


@pytest.mark.parametrize("trainer", SELECTED_FROM)
def test_crossval_summary_scores_the_pooled_validation_probabilities(folds, selection, trainer):
    """The Brier score of label 1 over the 6 validation cases of the 3 folds, computed here from their .npz and
    nnU-Net's gt_segmentations, is the one in the summary."""
    model = folds["results"] / f"{trainer}__{PLANS}__2d"
    gt = folds["root"] / "nnUNet_preprocessed" / folds["raw"].name / "gt_segmentations"
    squared, pixels = 0.0, 0
    for f in FOLDS:
        for npz in (model / f"fold_{f}" / "validation").glob("*.npz"):
            p = np.load(npz)["probabilities"][1, 0].astype(np.float64)
            reference = np.array(Image.open(gt / npz.name.replace(".npz", ".png"))) == 1
            squared, pixels = squared + ((p - reference) ** 2).sum(), pixels + p.size
    summary = json.loads((model / f"crossval_results_folds_{FOLDS_NAME}" / "uncertainty_summary.json").read_text())
    assert summary["num_cases"] == 2 * len(FOLDS)
    assert summary["calibration"]["per_class"]["1"]["brier"] == pytest.approx(squared / pixels, rel=1e-4)
    row = json.loads((folds["results"] / "crossval_summary.json").read_text())[f"{trainer}__{PLANS}__2d"]
    assert row["softmax_entropy"]["calibration"]["brier"] == pytest.approx(squared / pixels, rel=1e-4)
    assert 0 <= row["softmax_entropy"]["failure_detection"]["pixel_auroc"] <= 1
    for picture in ("calibration.png", "risk_coverage.png"):
        assert (model / f"crossval_results_folds_{FOLDS_NAME}" / "summary_figures" / picture).is_file()
    picture = Image.open(folds["results"] / "crossval_dice.png")
    assert picture.size[0] >= 900 and picture.size[1] >= 700  # readable


@pytest.fixture(scope="module")
def predictions(folds):
    """Both trainers' 3-fold predictions of the test cases with probabilities (and the guided one's uncertainty
    maps); the two ensembling tools over them; nnU-Net's postprocessing from a rules file written here (keep the
    largest component of label 1)."""
    root = folds["root"]
    commands = [("nnDiffSeg_predict", ["-i", folds["raw"] / "imagesTs", "-o", root / t, "-d", DATASET_ID, "-c", "2d",
                                       "-tr", t, "-f", *FOLDS, "-device", "cpu", "--save_probabilities", "-nps", 0,
                                       *(["--save_uncertainty"] if t != "nnUNetTrainer" else [])])
                for t in TRAINERS]
    commands.append(("nnDiffSeg_ensemble", ["-i", root / TRAINERS[0], root / TRAINERS[1], "-o", root / "ours",
                                            "-np", 1]))
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation
    with open(root / "pp.pkl", "wb") as f:
        pickle.dump(([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": [1]}]), f)
    commands.append(("nnDiffSeg_apply_postprocessing", ["-i", root / "ours", "-o", root / "ours_pp", "-pp_pkl_file",
                                                        root / "pp.pkl", "-np", 1]))
    commands.append(("nnDiffSeg_ensemble", ["-i", root / TRAINERS[0], "-o", root / "never", "-np", 1]))
    commands.append(("nnDiffSeg_apply_postprocessing", ["-i", root / "ours", "-o", root / "ours", "-pp_pkl_file",
                                                        root / "pp.pkl"]))
    ran = dict(zip(["predict_a", "predict_b", "ensemble", "postprocess", "one_folder", "in_place"],
                   run_batch(root, "predictions", commands, folds["env"])))
    for name in ("predict_a", "predict_b", "ensemble", "postprocess"):
        assert ran[name].returncode == 0, (name, ran[name].stderr[-3000:])
    run_tool("nnUNetv2_ensemble", "-i", root / TRAINERS[0], root / TRAINERS[1], "-o", root / "stock", "-np", 1)
    run_tool("nnUNetv2_apply_postprocessing", "-i", root / "stock", "-o", root / "stock_pp", "-pp_pkl_file",
             root / "pp.pkl", "-np", 1, "-plans_json", root / TRAINERS[0] / "plans.json")
    return {"root": root, "ran": ran, "cases": sorted(p.name for p in (folds["raw"] / "labelsTs").glob("*.png"))}


def test_prediction_folders_are_what_nnunet_ensembles(predictions):
    for trainer in TRAINERS:
        folder = predictions["root"] / trainer
        names = sorted(p.name for p in folder.iterdir())
        expected = [f"{c[:-4]}{e}" for c in predictions["cases"] for e in (".npz", ".pkl", ".png")]
        assert names == sorted(expected + RECORD + (["uncertainty"] if trainer != "nnUNetTrainer" else []))


def test_ensembles_are_the_argmax_of_the_mean_probabilities(predictions):
    root = predictions["root"]
    for case in predictions["cases"]:
        a, b = (np.load(root / t / case.replace(".png", ".npz"))["probabilities"].astype(np.float32) for t in TRAINERS)
        expected = ((a + b) / 2).argmax(0)[0]  # (classes, 1, H, W)
        for folder in ("ours", "stock"):
            np.testing.assert_array_equal(np.array(Image.open(root / folder / case)), expected)
    assert sorted(p.name for p in (root / "ours").iterdir()) == sorted(predictions["cases"] + RECORD + ["uncertainty"])
    assert sorted(p.name for p in (root / "stock").iterdir()) == sorted(predictions["cases"] + ["dataset.json"])


def test_ensemble_pools_the_uncertainty_of_its_members(predictions):
    """Two classes: nnU-Net's member has no sample spread, the guided one u (the 3 folds pooled); the ensemble's
    spread treats both members' samples as one set: sqrt(u^2 / 2 + ((p_a - p_b) / 2)^2) for the foreground
    probabilities p of the two members."""
    root = predictions["root"]
    for case in predictions["cases"]:
        name = case.replace(".png", ".npz")
        a, b = (np.load(root / t / name)["probabilities"][1].astype(np.float64) for t in TRAINERS)
        u = np.load(root / TRAINERS[1] / "uncertainty" / name)["uncertainty"].astype(np.float64)
        assert u.shape == a.shape and u.max() > 0
        pooled = np.load(root / "ours" / "uncertainty" / name)["uncertainty"]
        np.testing.assert_allclose(pooled, np.sqrt(u ** 2 / 2 + ((a - b) / 2) ** 2), atol=2e-3)
        assert (root / "ours" / "uncertainty" / case).is_file()  # the picture, with the image found via the record
        assert Image.open(root / "ours" / "uncertainty" / case).size[0] >= 800


def test_ensemble_names_a_corrupt_probability_file_before_writing(predictions, tmp_path):
    import shutil

    from nndiffseg.errors import NnDiffSegError
    from nndiffseg.inference.ensemble import ensemble
    broken = tmp_path / "broken"
    shutil.copytree(predictions["root"] / TRAINERS[0], broken)
    npz = broken / predictions["cases"][0].replace(".png", ".npz")
    npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(NnDiffSegError, match=f"could not read {npz}"):
        ensemble([str(predictions["root"] / TRAINERS[1]), str(broken)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("wrong", ["probabilities", "uncertainty"])
def test_ensemble_refuses_arrays_of_another_shape_before_writing(predictions, tmp_path, wrong):
    import shutil

    from nndiffseg.errors import NnDiffSegError
    from nndiffseg.inference.ensemble import ensemble
    changed = tmp_path / "changed"
    shutil.copytree(predictions["root"] / TRAINERS[1], changed)
    name = predictions["cases"][-1].replace(".png", ".npz")
    npz = changed / name if wrong == "probabilities" else changed / "uncertainty" / name
    array = np.load(npz)[wrong]
    np.savez_compressed(npz, **{wrong: array[..., :-1]})
    with pytest.raises(NnDiffSegError, match=f"{npz} (holds probabilities|has shape) .*{array.shape[-1] - 1}"):
        ensemble([str(predictions["root"] / TRAINERS[0]), str(changed)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_postprocessing_keeps_the_largest_component(predictions):
    """Label 1 keeps one component, at least as large as the largest of the input's, and loses nothing else;
    ours and nnU-Net's tool give the same maps."""
    root = predictions["root"]
    for case in predictions["cases"]:
        before, after = (np.array(Image.open(root / folder / case)) for folder in ("ours", "ours_pp"))
        np.testing.assert_array_equal(after, np.array(Image.open(root / "stock_pp" / case)))
        np.testing.assert_array_equal(after[before != 1], before[before != 1])
        assert set(np.unique(after[before == 1])) <= {0, 1}
        if (before == 1).any():
            largest = np.bincount(ndimage.label(before == 1)[0].ravel())[1:].max()
            assert ndimage.label(after == 1, np.ones((3, 3)))[1] == 1 and (after == 1).sum() >= largest


def test_ensembling_and_postprocessing_refuse_bad_input(predictions):
    assert_refused(predictions["ran"]["one_folder"], ["at least two prediction folders"])
    assert not (predictions["root"] / "never").exists()
    assert_refused(predictions["ran"]["in_place"], ["must differ from the input folder"])


def test_model_selection_refuses_a_training_stage_by_its_class_not_its_name(monkeypatch):
    """A trainer that declares itself a training stage (is_training_stage, as the mask autoencoder's) is no
    segmentation model to select, whatever it is called; refused before any fold is looked at."""
    import nndiffseg.trainers
    from nndiffseg.errors import NnDiffSegError
    from nndiffseg.evaluation.find_best_configuration import check_trained_folds

    class RenamedStage(nndiffseg.trainers.nnDiffSegTrainerMaskVAE_sd):
        pass

    monkeypatch.setattr(nndiffseg.trainers, "RenamedStage", RenamedStage, raising=False)
    with pytest.raises(NnDiffSegError, match="RenamedStage trains a stage of another trainer"):
        check_trained_folds("Dataset071_Toy", [{"trainer": "RenamedStage", "plans": PLANS, "configuration": "2d"}],
                            (0,), False)
