"""Test helpers: run the CLI on the tiny model in a subprocess, and a tiny parametrized model.

``tiny_run()`` makes one finished tiny run per process (cached) that several tests share.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

__all__ = ["TINY_ARGS", "compress_cmd", "resume_cmd", "run_compress", "tiny_run", "child_env", "tiny_base", "tiny_pm"]

# the tiny experiment on a small slice of KJV: a whole run in seconds
TINY_ARGS = ("experiment=tiny", "data.max_train_texts=1500", "data.max_heldout_texts=200")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child run: offline hub, W&B disabled unless given, quiet, 1 thread."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.pop("RANK", None), env.pop("LOCAL_RANK", None), env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def compress_cmd(run_dir: str | Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "acip.compress", *TINY_ARGS, f"hydra.run.dir={run_dir}", *overrides]


def resume_cmd(run_dir: str | Path, *overrides: str) -> list[str]:
    """Continue the run in ``run_dir``: its saved config, plus overrides of its keys."""
    return [sys.executable, "-m", "acip.compress", f"resume={run_dir}", *overrides]


def run_compress(run_dir: str | Path, *overrides: str, env: dict[str, str] | None = None, timeout: float = 900,
                 check: bool = True, cmd: Sequence[str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI to completion; on failure raise with the tail of its output."""
    proc = subprocess.run(list(cmd or compress_cmd(run_dir, *overrides)), env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir())
    if check and proc.returncode != 0:
        raise AssertionError(f"acip.compress failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tiny_run(logger: str = "wandb") -> Path:
    """One finished tiny run (W&B offline by default), shared by the tests of one process."""
    return _tiny_run(logger)


@functools.lru_cache(maxsize=None)
def _tiny_run(logger: str) -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix="acip-tiny-")) / "run"
    mode = "offline" if logger == "wandb" else "disabled"
    run_compress(run_dir, f"logger={logger}", env=child_env(WANDB_MODE=mode))
    return run_dir


def tiny_base():
    """A one-layer random Llama (hidden 16, vocabulary 50), the same for every call (seed 0)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg)


def tiny_pm(lora: dict | None = None):
    """:func:`tiny_base`, parametrized in the plain basis (optionally with LoRA)."""
    import acip

    return acip.parametrize(tiny_base(), lora=lora)
