"""Issue 28, prediction side: garbage in (NaN/Inf images, input files with another ending), prediction folders
continued with another model or settings, evaluation of a folder against itself or against 0/255 masks, and an
ensemble of one folder given twice. In-process tests of the functions; the refusals that need a trained model
run in tests/test_fault_injection.py's batch."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from nndiffseg.errors import NnDiffSegError

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

CT_JSON = {"channel_names": {"0": "CT", "1": "CT2"}, "file_ending": ".mha", "labels": {"background": 0, "lesion": 1}}


def write_slice(file: Path, values: np.ndarray) -> str:
    sitk.WriteImage(sitk.GetImageFromArray(values.astype(np.float32)), str(file))
    return str(file)


# ---------------------------------------------------------------------------------------------- item 4: NaN/Inf

def test_an_image_with_nan_or_inf_is_refused_naming_the_file(tmp_path):
    """An all-NaN CT slice was predicted as 685 pixels of haemorrhage; the case must fail instead."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nndiffseg.inference.predict import read_case

    fine = write_slice(tmp_path / "ct_0000.mha", np.zeros((8, 8)))
    nan = write_slice(tmp_path / "nan_0001.mha", np.full((8, 8), np.nan))
    inf = np.zeros((8, 8))
    inf[0, :3] = np.inf
    inf[1, 0] = -np.inf
    inf[2, 0] = np.nan
    inf = write_slice(tmp_path / "inf_0001.mha", inf)
    data, _ = read_case(SimpleITKIO(), [fine, fine], CT_JSON)
    assert data.shape[0] == 2
    with pytest.raises(NnDiffSegError) as refused:
        read_case(SimpleITKIO(), [fine, nan], CT_JSON)
    assert "nan_0001.mha: 64 NaN" in str(refused.value) and "ct_0000" not in str(refused.value)
    with pytest.raises(NnDiffSegError, match=r"inf_0001.mha: 1 NaN, 4 Inf"):
        read_case(SimpleITKIO(), [fine, inf], CT_JSON)


# ---------------------------------------------------------------------------------------------- item 7: endings

def test_input_files_with_another_ending_are_named_in_a_warning(tmp_path, capsys):
    from nndiffseg.inference.predict import group_input_files
    from nndiffseg.inference.prediction_folder import PREDICT_ARGS_FILE

    for name in ("a_0000.png", "b_0000.PNG", "c_0000.jpg", "d_0000.nii.gz", ".DS_Store", "dataset.json",
                 PREDICT_ARGS_FILE):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "uncertainty").mkdir()
    cases, problems = group_input_files(tmp_path, ".png")
    assert list(cases) == ["a"] and not problems
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("WARNING: 3 file(s)") and len(warning.splitlines()) == 1, warning
    assert "b_0000.PNG, c_0000.jpg, d_0000.nii.gz" in warning and ".png" in warning
    for i in range(9):
        (tmp_path / f"e{i}_0000.tif").write_bytes(b"")
    group_input_files(tmp_path, ".png")
    assert "12 file(s)" in (warning := capsys.readouterr().err) and "and 2 more" in warning  # the first few named


# ---------------------------------------------------------------------------------------------- item 7: evaluate

def write_masks(folder: Path, foreground: int, cases=("a", "b")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        mask = np.zeros((16, 16), np.uint8)
        mask[4:10, 4:10] = foreground
        Image.fromarray(mask).save(folder / f"{case}.png")


@pytest.mark.parametrize("how", ["same", "relative", "symlink"])
def test_evaluate_refuses_a_folder_against_itself(tmp_path, monkeypatch, how):
    from nndiffseg.evaluation.evaluate import evaluate_folders

    write_masks(tmp_path / "ref", 1)
    (tmp_path / "link").symlink_to(tmp_path / "ref")
    monkeypatch.chdir(tmp_path)
    prediction = {"same": str(tmp_path / "ref"), "relative": "ref", "symlink": str(tmp_path / "link")}[how]
    with pytest.raises(NnDiffSegError, match="-ref and -pred are the same folder"):
        evaluate_folders(str(tmp_path / "ref"), prediction, num_processes=1)
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize("dataset_json", [True, False])
def test_evaluate_names_references_saved_as_0_255(tmp_path, dataset_json):
    """Masks saved as 0/255 scored Dice 0 against correct 0/1 predictions, silently (or blaming them)."""
    from nndiffseg.evaluation.evaluate import evaluate_folders

    write_masks(tmp_path / "ref", 255)
    write_masks(tmp_path / "pred", 1)
    if dataset_json:
        (tmp_path / "pred" / "dataset.json").write_text(json.dumps(CT_JSON))
    with pytest.raises(NnDiffSegError) as refused:
        evaluate_folders(str(tmp_path / "ref"), str(tmp_path / "pred"), num_processes=1)
    message = str(refused.value)
    assert str(tmp_path / "ref" / "a.png") in message and "label 255" in message, message
    assert "0/255" in message and "0/1" in message and "prediction" not in message, message
    assert not (tmp_path / "pred" / "summary.json").exists()


# ---------------------------------------------------------------------------------------------- item 7: ensemble

def write_prediction_folder(folder: Path) -> Path:
    """The smallest folder check_prediction_folders accepts: one case with its probabilities."""
    folder.mkdir()
    for name, content in (("dataset.json", {"labels": {"background": 0, "lesion": 1}, "file_ending": ".png"}),
                          ("plans.json", {})):
        (folder / name).write_text(json.dumps(content))
    write_masks(folder, 1, cases=("a",))
    np.savez(folder / "a.npz", probabilities=np.full((2, 1, 16, 16), 0.5, np.float32))
    (folder / "a.pkl").write_bytes(pickle.dumps({}))
    return folder


@pytest.mark.parametrize("how", ["same", "symlink"])
def test_ensemble_refuses_a_folder_given_twice(tmp_path, how):
    from nndiffseg.inference.ensemble import check_prediction_folders

    a = write_prediction_folder(tmp_path / "A")
    (tmp_path / "link").symlink_to(a)
    check_prediction_folders([a, write_prediction_folder(tmp_path / "B")])
    twice = a if how == "same" else tmp_path / "link"
    with pytest.raises(NnDiffSegError, match=f"{a}.*more than once"):
        check_prediction_folders([a, tmp_path / "B", twice])


# ---------------------------------------------------------------------------------------------- item 3: continue

RECORD = {"input_folder": "/data/in", "model_folder": "/results/Dataset041_Toy/T__P__2d", "trainer": "T", "plans": "P",
          "configuration": "2d", "folds": ["0"], "checkpoint_name": "checkpoint_final.pth", "use_tta": True,
          "tile_step_size": 0.5, "inference_options": {}, "save_probabilities": False, "save_uncertainty": False,
          "save_samples": False, "temperature": None}


def test_continuation_needs_the_recorded_model_and_settings(tmp_path):
    from nndiffseg.inference.continuation import check_continuation
    from nndiffseg.inference.prediction_folder import PREDICT_ARGS_FILE

    out = tmp_path / "pred"
    check_continuation(out, RECORD, ".png")  # a new folder
    out.mkdir()
    (out / "summary.json").write_text("{}")
    check_continuation(out, RECORD, ".png")  # no predictions in it
    write_masks(out, 1, cases=("a",))
    with pytest.raises(NnDiffSegError, match=f"{out} holds predictions \\(a.png\\) but no {PREDICT_ARGS_FILE}"):
        check_continuation(out, RECORD, ".png")
    (out / PREDICT_ARGS_FILE).write_text('{"folds": ')
    with pytest.raises(NnDiffSegError, match=f"{PREDICT_ARGS_FILE} cannot be read"):
        check_continuation(out, RECORD, ".png")
    (out / PREDICT_ARGS_FILE).write_text(json.dumps({**RECORD, "input_folder": "/elsewhere"}))
    check_continuation(out, RECORD, ".png")  # the same cases from another folder: fine
    with pytest.raises(NnDiffSegError) as refused:
        check_continuation(out, {**RECORD, "folds": ["0", "1"], "inference_options": {"steps": 2},
                                 "save_samples": True}, ".png")
    assert str(refused.value).count(": recorded ") == 3 and 'folds: recorded ["0"], now ["0", "1"]; ' \
        'inference_options: recorded {}, now {"steps": 2}; save_samples: recorded false, now true' in str(refused.value)
    with pytest.raises(NnDiffSegError, match=r"temperature: recorded null, now 1.5"):  # recalibrated in between
        check_continuation(out, {**RECORD, "temperature": 1.5}, ".png")
    (out / PREDICT_ARGS_FILE).write_text(json.dumps({k: v for k, v in RECORD.items() if k != "save_uncertainty"}))
    with pytest.raises(NnDiffSegError, match=r"save_uncertainty: recorded \(not recorded\), now false"):
        check_continuation(out, RECORD, ".png")


def test_a_case_counts_as_predicted_only_when_its_outputs_are_whole(tmp_path):
    """An empty or cut-short label map, or a missing file of those the run writes per case, means: predict again."""
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    from nndiffseg.inference.prediction_folder import case_outputs, is_predicted

    write_masks(tmp_path, 1, cases=("whole", "cut"))
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:40])
    (tmp_path / "empty.png").write_bytes(b"")
    reader = NaturalImage2DIO()
    assert case_outputs("c", ".png", True, True, 2) == ["c.png", "c.npz", "c.pkl", "uncertainty/c.npz",
                                                        "samples/sample_0/c.png", "samples/sample_1/c.png"]
    assert is_predicted(tmp_path, case_outputs("whole", ".png", False, False, 0), reader)
    for case in ("cut", "empty", "missing"):
        assert not is_predicted(tmp_path, case_outputs(case, ".png", False, False, 0), reader), case
    assert not is_predicted(tmp_path, case_outputs("whole", ".png", True, False, 0), reader)  # no .npz
    (tmp_path / "whole.npz").write_bytes(b"x")
    (tmp_path / "whole.pkl").write_bytes(b"")
    assert not is_predicted(tmp_path, case_outputs("whole", ".png", True, False, 0), reader)
