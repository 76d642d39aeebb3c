"""The header every benchmark prints: machine, thread count, package versions, git commit."""
from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

import torch

__all__ = ["machine_header"]


def machine_header(packages: tuple[str, ...] = ("transformers", "acip")) -> str:
    """``machine: <cpu>, N cores, T torch threads`` + ``versions: ...`` + ``commit: ...``."""
    import os

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    vers = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in packages:
        try:
            vers.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            vers.append(f"{name} absent")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"{platform.system()} {platform.release()}\nversions: {', '.join(vers)}\ncommit: {commit}"
    )
