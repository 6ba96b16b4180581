import os
import shutil
import sys
from pathlib import Path

import pytest

# Parallel test workers (pytest-xdist, see pytest.ini) share the cores: one torch thread each, also in the
# nnDiffSeg_ tools the tests start (they honour OMP_NUM_THREADS). Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]

# tests/site/sitecustomize.py (fewer fingerprint samples for toy datasets) in this process and every one it starts
_SITE = str(Path(__file__).resolve().parent / "site")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SITE, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, _SITE)
import sitecustomize  # noqa: E402,F401

# ../shared/data beside the repository (also in CI); NNDIFFSEG_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("NNDIFFSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
ISIC2017_SAMPLE = SHARED_DATA / "isic2017_sample"
LIDC_MULTIRATER_SAMPLE = SHARED_DATA / "lidc_multirater_sample"


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results folders for one test."""
    paths = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
        paths[name] = folder
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return paths


_MODULES_WITH_FAILURES = set()  # this worker's; their module folders are kept for a look


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _MODULES_WITH_FAILURES.add(item.path)
    return report


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """Makes folders that live as long as the test module: removed at its end unless one of its tests failed.

    With pytest.ini's tmp_path_retention_policy (a passing test's tmp_path goes at once), a run of the suite peaks
    at a few GB in /tmp instead of leaving about 8 GB behind, three runs of which filled CI's disk."""
    made = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.path not in _MODULES_WITH_FAILURES:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def _shared_sample(folder: Path, inside: str, what: str) -> Path:
    if not (folder / inside).is_dir():
        pytest.skip(f"{what} not found at {folder} (it sits beside the repository in CI; set NNDIFFSEG_SHARED_DATA "
                    f"to its parent folder to run these tests)")
    return folder


@pytest.fixture(scope="session")
def isic2017_sample() -> Path:
    """The 69 real ISIC 2017 pairs in ../shared/data; tests using them skip where it is absent."""
    return _shared_sample(ISIC2017_SAMPLE, "ISIC-2017_Training_Data", "real ISIC sample")


@pytest.fixture(scope="session")
def lidc_multirater_sample() -> Path:
    """The 28 real LIDC slices with 4 raters' masks each in ../shared/data; tests using them skip where it is absent."""
    return _shared_sample(LIDC_MULTIRATER_SAMPLE, "training", "real LIDC multi-rater sample")


# The longest modules first: pytest-xdist hands whole files (--dist loadfile) to whichever worker is free, in
# collection order, so a long module collected last would run alone at the end.
# Measured with --durations=0 on 2026-12-07 (2 workers, suite 32 min on a slow day; before model selection went to
# 3 folds and the random-rater runs into batches, which took about 90 and 110 s off those two): multi-rater
# learning 345 s (one test), model selection 371 s, guided trainer 291 s, random rater 268 s, latent trainers
# 260 s, latent learning 258 s, latent heads 253 s, pipeline 244 s, ISIC sample 188 s, DDP 173 s, demo 171 s,
# fault injection 166 s, benchmarks 148 s, ignore label 115 s, Stroke2021 99 s.
LONGEST_FIRST = ("test_multirater_learning.py", "test_model_selection.py", "test_guided_trainer.py",
                 "test_random_rater.py", "test_latent_trainers.py", "test_latent_learning.py", "test_latent_heads.py",
                 "test_pipeline.py", "test_isic_sample_pipeline.py", "test_ddp.py", "test_demo.py",
                 "test_fault_injection.py", "test_benchmarks.py", "test_ignore_label_and_regions.py",
                 "test_convert_stroke2021.py", "test_predictor.py", "test_convert_multirater.py",
                 "test_faults_preprocessing.py", "test_calibrate.py", "test_guided_heads.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order kept otherwise
