"""Loaded at start-up by every Python process the tests start (conftest.py puts this folder on PYTHONPATH).

nnU-Net's fingerprint draws 10e7 foreground intensities, with replacement, whatever the dataset's size. For the
tests' toy datasets (a few thousand foreground pixels per image) that is the same few values repeated, and it
was most of every planning run (about 25 of 30 s: drawing them per case, then percentiles of 10e7 values).
The tests draw at most FINGERPRINT_SAMPLES instead; the tools themselves are unchanged, so a user's planning
is nnU-Net's."""
import importlib.abc
import importlib.util
import sys

FINGERPRINT_SAMPLES = 100_000
_TARGET = "nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor"


def _cap_samples(module) -> None:
    extractor = module.DatasetFingerprintExtractor
    original_init = extractor.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.num_foreground_voxels_for_intensitystats = min(self.num_foreground_voxels_for_intensitystats,
                                                            FINGERPRINT_SAMPLES)

    extractor.__init__ = __init__


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def patched_exec_module(module):
            exec_module(module)
            _cap_samples(module)

        spec.loader.exec_module = patched_exec_module
        return spec


if _TARGET in sys.modules:
    _cap_samples(sys.modules[_TARGET])
else:
    sys.meta_path.insert(0, _PatchOnImport())
