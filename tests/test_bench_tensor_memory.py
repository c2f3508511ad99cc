"""The benchmarks' peak-tensor measure (`benchmarks/common.py:TensorMemory`): the figure the
DPO benchmark reports as "peak tensors" must be the highest sum of live tensor bytes, split at
training's start and at the last step's end as its docstring says."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import TensorMemory  # noqa: E402  (a script folder, not a package)

MIB = 2**20


def tensor(mib: int) -> torch.Tensor:
    return torch.ones(mib * MIB // 4, dtype=torch.float32)  # written, so the bytes are really there


def test_peaks_are_the_live_bytes_of_each_phase():
    tracker = TensorMemory()
    tracker.start()
    model = tensor(4)
    scratch = tensor(3)  # set-up peak 7, freed before training
    del scratch
    tracker.mark("train_begin")  # 4 live
    for step_mib in (8, 10, 6):  # each step holds its activations, then frees them
        activations = tensor(step_mib)
        del activations
        tracker.mark("step_end")
    save_copy = tensor(16)  # after the last step (a final save): outside the reported peak
    del save_copy
    result = tracker.result()
    del model

    assert abs(result["peak_setup_tensor_mib"] - 7) < 0.01
    assert abs(result["peak_steps_tensor_mib"] - 14) < 0.01  # 4 + the largest step's 10
    assert abs(result["peak_tensor_mib"] - 14) < 0.01
    assert abs(result["peak_process_tensor_mib"] - 20) < 0.01  # 4 + the save's 16
    assert abs(result["tensor_mib_at"]["train_begin"] - 4) < 0.01
    assert abs(result["end_tensor_mib"] - 4) < 0.01
    assert result["allocations"] >= 6


def test_untracked_when_never_started():
    tracker = TensorMemory()
    tracker.mark("train_begin")  # inert: no profiler, nothing recorded, nothing raised
    assert tracker.profiler is None
