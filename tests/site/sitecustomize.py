"""Loaded at start-up by every Python process the tests start (conftest.py puts this folder on PYTHONPATH).

nnU-Net's fingerprint draws 10e7 foreground intensities, with replacement, whatever the dataset's size. For the
tests' toy datasets (a few thousand foreground pixels per image) that is the same few values repeated, and it
was most of every planning run (about 25 of 30 s: drawing them per case, then percentiles of 10e7 values).
The tests draw at most FINGERPRINT_SAMPLES instead; the tools themselves are unchanged, so a user's planning
is nnU-Net's.

With nnDiffSeg_test_hook naming pool_result_transfer, a worker of a spawn pool (nnU-Net's fingerprint, integrity
check and preprocessing pools; its fork pools only list files) stops inside each result it sends (see
_pause_inside_result_transfers), so that a test can signal it exactly there."""
import importlib.abc
import importlib.util
import os
import sys

FINGERPRINT_SAMPLES = 100_000
RESULT_TRANSFER = "pool_result_transfer"
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


def _pause_inside_result_transfers() -> None:
    """A worker of a spawn pool sends the length and first half of a result, reaches the hook
    (marker, and with ':pause' a pause), then sends the rest: a signal sent at the marker lands where a worker
    that dies leaves the pool's result thread waiting for the rest of a message."""
    import multiprocessing
    import struct
    from multiprocessing.queues import SimpleQueue
    from multiprocessing.reduction import ForkingPickler
    put = SimpleQueue.put

    def put_with_a_pause(self, obj):
        if multiprocessing.parent_process() is None or multiprocessing.get_start_method(allow_none=True) != "spawn":
            return put(self, obj)  # the pool's own process (its sentinels), or a forked worker
        from nndiffseg.test_seam import reached
        data = bytes(ForkingPickler.dumps(obj))
        with self._wlock:  # the format of Connection.send_bytes
            self._writer._send(struct.pack("!i", len(data)) + data[:len(data) // 2])
            reached(RESULT_TRANSFER)
            self._writer._send(data[len(data) // 2:])

    SimpleQueue.put = put_with_a_pause


if RESULT_TRANSFER in os.environ.get("nnDiffSeg_test_hook", ""):
    _pause_inside_result_transfers()
