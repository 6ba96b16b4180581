"""nnDiffSegTrainerGuided inside nnU-Net on a 3-class toy dataset: it learns, it predicts through our and
stock tools with its sampler options, the same seed gives the same output, and its checkpoint carries the
text embeddings so prediction needs no CLIP."""
import json

import numpy as np
import pytest
import torch
from cli import PLAN_QUICKLY, assert_refused, nnunet_folders, run_batch, run_tool
from PIL import Image
from resume import assert_same_weights, crash_after_first_epoch, uninterrupted_results
from toy_data import assert_beats_trivial_rules, write_toy_dataset

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

DATASET_ID = 41
# the learning run: 3-class toy discs (48 x 64 images, patch 64 x 64), 2 x 20 iterations of batch 2, about
# 90 s on one thread with planning, the final validation and the predictions
EPOCHS, ITERS = 2, 20
NOISE = 60  # against colour offsets of 70-140: a per-pixel colour rule confuses many pixels
MARGIN = 0.05  # per class, over the better of the two trivial rules
DDIM_TOLERANCE = 0.9


def _dice(prediction: np.ndarray, reference: np.ndarray, c: int) -> float:
    p, r = prediction == c, reference == c
    return 2 * float((p & r).sum()) / max(float(p.sum() + r.sum()), 1.0)


@pytest.fixture(scope="module")
def guided(module_tmp):
    root = module_tmp("guided")
    env = nnunet_folders(root)
    raw = write_toy_dataset(root / "nnUNet_raw", DATASET_ID, num_train=16, num_test=4, num_classes=2, noise=NOISE)
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", DATASET_ID, *PLAN_QUICKLY, env=env)
    log = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainerGuided", "-device", "cpu",
                   "--num_epochs", EPOCHS, "--iters_per_epoch", ITERS, "--clip_model", "random", env=env)
    model = root / "nnUNet_results" / raw.name / "nnDiffSegTrainerGuided__nnDiffSegPlans__2d"
    return {"root": root, "env": env, "raw": raw, "log": log.stdout, "model": model}


def _common(guided, out):
    return ["-i", guided["raw"] / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", "2d", "-tr", "nnDiffSegTrainerGuided",
            "-f", 0, "-device", "cpu"]


# the module's nnDiffSeg_predict runs, by output folder: one process for all of them (tests/cli.py run_batch)
PREDICTIONS = {
    "default": [],
    "dpm_staple": ["--sampler", "dpmsolver", "--steps", 5, "--num_samples", 3, "--fusion", "staple",
                   "--sampling_seed", 1],
    "dpm_staple_old_seed_flag": ["--sampler", "dpmsolver", "--steps", 5, "--num_samples", 3, "--fusion", "staple",
                                 "--seed", 1],
    "never": ["--num_samples", 0],
    "uncertainty3": ["--save_uncertainty", "--save_samples"],
    "uncertainty3_spread": ["--save_uncertainty", "--uncertainty", "spread"],
    # the samples' own mean (not averaged with the prior), so that one sample's label map is the prediction
    "uncertainty1": ["--save_uncertainty", "--num_samples", 1, "--save_samples", "--uncertainty", "spread",
                     "--fusion", "mean"],
}


@pytest.fixture(scope="module")
def predictions(guided):
    commands = [("nnDiffSeg_predict", [*_common(guided, guided["root"] / name), "-nps", 0, *options])
                for name, options in PREDICTIONS.items()]
    tool, args = commands[list(PREDICTIONS).index("uncertainty3")]
    commands.append((tool, [*args, "--continue_prediction"]))  # after it: every case done
    results = run_batch(guided["root"], "predictions", commands, guided["env"])
    return {**dict(zip(PREDICTIONS, results)), "uncertainty3_continued": results[-1]}


def _predicted(guided, predictions, name):
    result = predictions[name]
    assert result.returncode == 0, result.stderr[-3000:]
    return guided["root"] / name


@pytest.fixture(scope="module")
def predicted(guided, predictions):
    return _predicted(guided, predictions, "default")


def test_guided_trainer_learns_toy_shapes(guided, predicted):
    """Default prediction (cross-attention text, one DDIM step, 3 samples, their mean averaged with the prior's
    probabilities) of the 4 test cases, Dice per class pooled. Measured after 2 x 20 iterations (unseeded, one
    thread, the samples' mean alone): 0.899 / 0.955 (4 x 20: 0.924 / 0.961), against 0.151 / 0.128 for an
    all-foreground mask and 0.254 / 0.611 for the per-pixel colour rule.
    (At the earlier noise sd of 20 the colour rule scored 0.886 / 0.970, above that test's bar of 0.8.)"""
    assert_beats_trivial_rules(predicted, guided["raw"], 2, MARGIN)


def test_checkpoint_carries_the_text_embeddings(guided):
    checkpoint = torch.load(guided["model"] / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    text = checkpoint["network_weights"]["text_embeddings"]
    assert text.shape == (3, 1024)
    assert text[:, :64].norm(dim=1).allclose(torch.ones(3)) and (text[:, 64:] == 0).all()  # random CLIP: 64-d
    assert "class prompts embedded with CLIP random" in guided["log"]


def test_stock_predict_gives_the_same_seeded_output(guided, predicted):
    """A second process with the same seed (stock nnUNetv2_predict here) gives the same label maps."""
    from nndiffseg.ext_trainer import EXT_TRAINER_DIR
    stock = guided["root"] / "stock"
    run_tool("nnUNetv2_predict", *_common(guided, stock), "-p", "nnDiffSegPlans", "-npp", 1, "-nps", 1,
             "--disable_tta", env={**guided["env"], "nnUNet_extTrainer": EXT_TRAINER_DIR})
    for f in sorted(predicted.glob("*.png")):
        ours = np.array(Image.open(f))
        np.testing.assert_array_equal(ours, np.array(Image.open(stock / f.name)))
        assert set(np.unique(ours)) <= {0, 1, 2}


def test_trainer_head_settings_are_the_ones_whose_samples_carry_doubt():
    """tests/test_guided_heads.py shows on a toy head that these settings' samples split where the label is a
    coin flip and agree where it is sure; that holds for the trainer only while it uses them."""
    from test_guided_heads import TRAINER_HEAD_SETTINGS

    from nndiffseg.trainers.guided import nnDiffSegTrainerGuided
    assert nnDiffSegTrainerGuided.head_settings == TRAINER_HEAD_SETTINGS


_PREDICT_WITH_OTHER_DEFAULTS = """
import sys
from nndiffseg.trainers.guided import nnDiffSegTrainerGuided
from nndiffseg.inference.predict import predict_folder
nnDiffSegTrainerGuided.head_settings = dict(prediction_type="epsilon", schedule="cosine", sampler="ddpm", steps=3,
                                            num_samples=2, fusion="staple", prior_weight=1.0)
failures = predict_folder(sys.argv[1], sys.argv[2], sys.argv[3], "2d", trainer="nnDiffSegTrainerGuided", folds=["0"],
                          device="cpu", num_processes_export=0)
sys.exit(1 if failures else 0)
"""


def test_changed_class_defaults_do_not_change_what_the_saved_model_predicts(guided, predicted):
    """Every head setting of the trainer class changed after training (prediction type, schedule, sampler,
    steps, samples, fusion): the checkpoint's own settings are used, so the label maps stay the same."""
    import subprocess
    import sys
    out = guided["root"] / "other_defaults"
    result = subprocess.run([sys.executable, "-c", _PREDICT_WITH_OTHER_DEFAULTS, guided["raw"] / "imagesTs", out,
                             str(DATASET_ID)], env={**__import__("os").environ, **guided["env"]}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for f in sorted(predicted.glob("*.png")):
        np.testing.assert_array_equal(np.array(Image.open(out / f.name)), np.array(Image.open(f)))


def test_sampler_options_and_staple_fusion_run(guided, predictions):
    out = _predicted(guided, predictions, "dpm_staple")
    assert_beats_trivial_rules(out, guided["raw"], 2, MARGIN)


def test_bad_sampler_options_are_refused_before_anything_is_written(guided, predictions):
    assert_refused(predictions["never"], ["--num_samples must be at least 1"])
    assert not (guided["root"] / "never").exists()


def test_the_old_seed_flag_of_predict_still_seeds_the_sampling_with_a_warning(guided, predictions):
    old = _predicted(guided, predictions, "dpm_staple_old_seed_flag")
    warning = "WARNING: --seed is deprecated in nnDiffSeg_predict; use --sampling_seed"
    assert predictions["dpm_staple_old_seed_flag"].stderr.count(warning) == 1
    new = _predicted(guided, predictions, "dpm_staple")
    for f in sorted(new.glob("*.png")):
        np.testing.assert_array_equal(np.array(Image.open(old / f.name)), np.array(Image.open(f)))


def test_the_clis_options_are_the_heads_and_trainers_declarations_each_once():
    """nnDiffSeg_predict's groups hold every head's prediction options once (the shared ones in the first group), and
    their help leaves the default to the checkpoint; nnDiffSeg_train's hold every trainer's training options."""
    from nndiffseg.guided.segmenter import GuidedSegmenter
    from nndiffseg.latent.segmenter import LatentSegmenter
    from nndiffseg.registry import PREDICT, TRAIN, option_groups
    from nndiffseg.trainers import nnDiffSegTrainerGuided, nnDiffSegTrainerLatent
    groups = option_groups(PREDICT)
    declared = [o for _, group in groups for o in group]
    assert len(declared) == len(set(declared)) == len(set(GuidedSegmenter.prediction_options +
                                                          LatentSegmenter.prediction_options))
    assert [o.cli for o in groups[0][1]] == ["--steps", "--sampler", "--sampling_seed"]
    assert not any("default" in o.help for o in declared)
    training = [o.name for _, group in option_groups(TRAIN) for o in group]
    assert set(training) == {o.name for o in nnDiffSegTrainerGuided.training_options +
                             nnDiffSegTrainerLatent.training_options}


def test_freeze_prior_without_a_prior_is_refused_before_any_work():
    from nndiffseg.errors import NnDiffSegError
    from nndiffseg.registry import TRAIN, check_options
    from nndiffseg.trainers import nnDiffSegTrainerGuided
    with pytest.raises(NnDiffSegError, match="--freeze_prior needs --prior CHECKPOINT"):
        check_options(nnDiffSegTrainerGuided, {"freeze_prior": True, "clip_model": "random"}, TRAIN)
    assert check_options(nnDiffSegTrainerGuided, {"freeze_prior": True, "prior": "p.pth", "seed": None}, TRAIN) == \
        {"freeze_prior": True, "prior": "p.pth"}


def test_save_uncertainty_writes_a_map_and_a_picture_per_case(guided, predictions):
    """At the default sampling (one DDIM step, 3 samples) the samples differ, and --save_samples writes each.
    (Where they differ is asserted on a toy head whose labels are partly a coin flip, in tests/test_guided_heads.py,
    and measured on real data in docs/benchmarks.md, "Guided uncertainty"; this model's toy discs have no such
    ambiguity, and after 40 iterations its samples differ about as little near the borders as away from them.)"""
    total_run, spread_run, single = (_predicted(guided, predictions, name)
                                     for name in ("uncertainty3", "uncertainty3_spread", "uncertainty1"))
    assert json.loads((spread_run / "nndiffseg_predict_args.json").read_text())["inference_options"] == \
        {"uncertainty": "spread"}
    cases = [f.name[:-len("_0000.png")] for f in sorted((guided["raw"] / "imagesTs").glob("*_0000.png"))]
    for case in cases:
        spread = np.load(spread_run / "uncertainty" / f"{case}.npz")["uncertainty"]
        assert spread.shape == (1, 48, 64) and spread.min() >= 0 and spread.max() <= 0.5 + 1e-6  # std in [0, 1]
        assert spread.max() > 0  # the 3 samples are not identical
        # the default map (total): the same samples (same seed) with the prior's variance added, so never less,
        # and at most sqrt(0.25 + 0.25)
        total = np.load(total_run / "uncertainty" / f"{case}.npz")["uncertainty"]
        assert (total >= spread - 1e-5).all() and total.max() <= 0.5 ** 0.5 + 1e-6 and (total > spread + 1e-3).any()
        assert Image.open(total_run / "uncertainty" / f"{case}.png").size[0] >= 2 * 400  # overlay + map, enlarged
        assert not (np.load(single / "uncertainty" / f"{case}.npz")["uncertainty"]).any()  # one sample: no spread
        # --save_samples: with one sample, that sample's label map is the prediction
        np.testing.assert_array_equal(np.array(Image.open(single / "samples" / "sample_0" / f"{case}.png")),
                                      np.array(Image.open(single / f"{case}.png")))
    assert sorted(p.name for p in (total_run / "samples").iterdir()) == ["sample_0", "sample_1", "sample_2"]
    for folder in (total_run / "samples").iterdir():  # each a complete prediction folder
        assert sorted(f.name for f in folder.iterdir()) == sorted([f"{c}.png" for c in cases] + [
            "dataset.json", "nndiffseg_predict_args.json", "plans.json"])
    samples = [np.array(Image.open(total_run / "samples" / f"sample_{k}" / f"{c}.png"))
               for k in range(3) for c in cases]
    assert any((a != b).any() for a, b in zip(samples[:len(cases)], samples[len(cases):]))  # they differ


def test_continue_prediction_finds_every_case_with_its_maps_and_samples_done(predictions):
    """The files --continue_prediction requires of a finished case (uncertainty map, each sample's label map) are
    the ones --save_uncertainty --save_samples write: nothing is predicted again."""
    result = predictions["uncertainty3_continued"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 case(s) already predicted" in result.stdout and "Predicted 0 case(s)" in result.stdout, result.stdout


def _load_trained_network(guided):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nndiffseg.ext_trainer import register_ext_trainer_dir
    register_ext_trainer_dir()
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(guided["model"]), [0], "checkpoint_final.pth")
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    return predictor


def test_stitched_scores_with_uncertainty_match_nnunets_sliding_window(guided):
    """HeadPredictor stitches the scores, spread and samples of one call per tile in nnU-Net's own sliding window
    (tile steps, Gaussian weights, mirroring): the scores are nnU-Net's predictor's logits, bit for bit."""
    from nndiffseg.ext_trainer import register_ext_trainer_dir
    from nndiffseg.inference.predictor import HeadPredictor
    register_ext_trainer_dir()
    predictor = HeadPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(guided["model"]), [0], "checkpoint_final.pth")
    predictor.network.set_inference_options(num_samples=2, fusion="mean")  # the scores are the samples' mean
    reader = predictor.plans_manager.image_reader_writer_class()
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    image = sorted((guided["raw"] / "imagesTs").glob("*_0000.png"))[0]
    data, properties = reader.read_images([str(image)])
    data, _, _ = preprocessor.run_case_npy(data, None, properties, predictor.plans_manager,
                                           predictor.configuration_manager, predictor.dataset_json)
    data = torch.from_numpy(data)
    output = predictor.predict_head_output(data, uncertainty=True, samples=True)
    scores, uncertainty, samples = output.scores, output.uncertainty, output.samples
    reference = predictor.predict_logits_from_preprocessed_data(data)
    assert torch.equal(scores, reference) and uncertainty.shape == tuple(data.shape[1:])
    assert uncertainty.min() >= 0 and uncertainty.max() > 0
    # the stitched samples are probabilities whose mean says what the scores say (the scores are stitched in
    # log space, the samples in probability space, so they agree on the labels, not to the digit)
    assert samples.shape == (2, *scores.shape)
    torch.testing.assert_close(samples.sum(1), torch.ones(samples.shape[:1] + samples.shape[2:]), atol=1e-2, rtol=0)
    assert (samples.mean(0).argmax(0) == scores.argmax(0)).float().mean() >= 0.95


def test_few_step_ddim_stays_close_to_a_long_ddpm_chain(guided):
    """DDIM-10 against DDPM-100, one sample each, on 2 test images (batched, zero-padded to the patch):
    the label maps agree to a Dice of at least DDIM_TOLERANCE per class, and their Dice with the reference
    differs by at most 0.05. (Measured: 0.987 / 0.998; DDPM-100 and DDPM-250 agreed at 0.998 / 0.999, so the
    shorter chain stands in for the long one at 40 % of the cost.)"""
    predictor = _load_trained_network(guided)
    reader = predictor.plans_manager.image_reader_writer_class()
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    images, labels = [], []
    for f in sorted((guided["raw"] / "imagesTs").glob("*_0000.png"))[:2]:
        data, properties = reader.read_images([str(f)])
        data, _, _ = preprocessor.run_case_npy(data, None, properties, predictor.plans_manager,
                                               predictor.configuration_manager, predictor.dataset_json)
        images.append(torch.nn.functional.pad(torch.from_numpy(data[:, 0]), (0, 0, 0, 16)))  # 48 -> 64 rows
        labels.append(np.array(Image.open(guided["raw"] / "labelsTs" / f.name.replace("_0000", ""))))
    network = predictor.network.eval()
    with torch.no_grad():
        x = torch.stack(images).float()
        ddpm = network.sample(x, 1, "ddpm", 100)[0].argmax(1)[:, :48].numpy()
        ddim = network.sample(x, 1, "ddim", 10)[0].argmax(1)[:, :48].numpy()
    reference = np.stack(labels)
    for c in (1, 2):
        assert _dice(ddim, ddpm, c) >= DDIM_TOLERANCE, (c, _dice(ddim, ddpm, c))
        assert abs(_dice(ddim, reference, c) - _dice(ddpm, reference, c)) <= 0.05


def test_interrupted_run_resumed_with_c_ends_with_the_weights_of_an_uninterrupted_one(guided):
    """A seeded run killed after epoch 0, resumed with --c alone (the seed and --clip_model come from the run's
    record; the embeddings from the checkpoint), ends with the same weights as the seeded run never
    interrupted; --c with an option that differs from the record is refused before anything is written."""
    fold = guided["model"] / "fold_1"
    options = {"clip_model": "random", "seed": 5}
    crash_after_first_epoch("nnDiffSegTrainerGuided", DATASET_ID, 1, options, guided["env"])
    interrupted = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    resume = [DATASET_ID, "2d", 1, "-tr", "nnDiffSegTrainerGuided", "-device", "cpu", "--c"]
    changed, resumed = run_batch(guided["root"], "resume", [
        ("nnDiffSeg_train", [*resume, "--clip_model", "ViT-B-32:/no/such/weights.bin"]), ("nnDiffSeg_train", resume)],
        guided["env"])
    assert_refused(changed, ["--c resumes with the options the run was started with", "--clip_model"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "class prompts embedded" not in resumed.stdout
    reference_env = uninterrupted_results(guided["root"], guided["env"])
    run_tool("nnDiffSeg_train", DATASET_ID, "2d", 1, "-tr", "nnDiffSegTrainerGuided", "-device", "cpu",
             "--num_epochs", 2, "--iters_per_epoch", 2, "--clip_model", "random", "--seed", 5, env=reference_env)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    reference = torch.load(guided["root"] / "nnUNet_results_uninterrupted" / guided["raw"].name / guided["model"].name /
                           "fold_1" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert interrupted["current_epoch"] == 1 and final["current_epoch"] == 2
    assert torch.equal(final["network_weights"]["text_embeddings"], interrupted["network_weights"]["text_embeddings"])
    assert not torch.equal(final["network_weights"]["prior.encoder.stages.0.0.convs.0.conv.weight"],
                           interrupted["network_weights"]["prior.encoder.stages.0.0.convs.0.conv.weight"])
    assert_same_weights(final, reference)
