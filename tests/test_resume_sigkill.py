"""Resume: SIGKILL a run mid-way, resume it, get the uninterrupted run's score map bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import torch

import acip
from helpers_train import child_env, compress_cmd, resume_cmd, run_compress, tiny_run


def test_killed_and_resumed_run_matches_the_uninterrupted_one(tmp_path):
    reference = tiny_run()  # same seed and config; only its logger differs
    run = tmp_path / "run"
    proc = subprocess.Popen(compress_cmd(run, "logger=none", "debug.step_delay_s=0.25"), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 600
    while not (run / "checkpoints" / "step000005.ckpt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # a couple of steps past the checkpoint, then the kill
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "results.json").exists(), "the run finished before it was killed"
    killed_at = acip.ScoreMap.load(run / "score_map.safetensors").meta["global_step"]

    out = run_compress(run, cmd=resume_cmd(run, "debug.step_delay_s=0"))  # its saved config, one key changed
    assert "run directory" in out.stdout
    got = acip.ScoreMap.load(run / "score_map.safetensors")
    want = acip.ScoreMap.load(reference / "score_map.safetensors")
    assert got.meta["global_step"] == want.meta["global_step"] > killed_at
    for name in want.scores:  # identical on CPU: same batches, optimizer state, schedule and phase
        assert torch.equal(got.scores[name], want.scores[name]), name
    res, ref = (json.loads((d / "results.json").read_text()) for d in (run, reference))
    assert res["ppl"] == ref["ppl"] and res["stop_step"] == ref["stop_step"]
