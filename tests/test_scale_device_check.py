"""scripts/device_check.sh fails fast and clearly where there is no CUDA device (exit 2, one line)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run in full")
def test_device_check_exits_2_with_one_line_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh")], capture_output=True, text=True,
                         env=env, timeout=600, cwd="/")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stdout == ""
    ours = [l for l in res.stderr.splitlines() if l.startswith("device_check:")]
    assert len(ours) == 1 and "no CUDA device" in ours[0] and "NVIDIA GPU" in ours[0]
    assert res.stderr.rstrip().splitlines()[-1] == ours[0]  # the last word is ours, nothing after it
