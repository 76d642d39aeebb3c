"""Write a training corpus of Python standard-library documentation (``pydoc`` plain text) or source.

The modules are disjoint from the ones ``scripts/bench_quality.py`` evaluates on (its
``PYDOC_MODULES``), so a run trained on this file is tuned on the same *kind* of text as the
second benchmark domain, never on the evaluation text itself. Used to measure how much of the
out-of-domain loss is the training domain (docs/BENCHMARKS.md, training quality section):

    python scripts/pydoc_corpus.py outputs/pydoc_train.txt
    python -m acip.compress data=text_files data.paths='[outputs/pydoc_train.txt]'

``--kind source`` writes the same modules' Python source instead (the kind of the benchmark's
``python_source`` domain, again never its modules); modules without a ``.py`` file are skipped.

Output: a ``.txt`` in ``data=text_files`` format (blocks of up to 20 non-empty lines separated by
blank lines), written to a temporary file and renamed.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import PYDOC_MODULES  # noqa: E402

from acip.eval.domains import pydoc_texts  # noqa: E402

TRAIN_MODULES = [
    "os", "shutil", "glob", "fnmatch", "tempfile", "heapq", "bisect", "array", "enum", "datetime",
    "calendar", "decimal", "fractions", "random", "statistics", "hashlib", "hmac", "secrets",
    "base64", "struct", "codecs", "difflib", "pprint", "reprlib", "copy", "weakref", "types", "abc",
    "contextlib", "operator", "inspect", "ast", "tokenize", "shlex", "configparser", "zipfile",
    "tarfile", "gzip", "sqlite3", "socket", "selectors", "threading", "queue", "sched",
    "concurrent.futures", "urllib.parse", "http.client", "email.message", "html",
    "xml.etree.ElementTree", "uuid", "ipaddress", "timeit", "traceback", "warnings", "unittest",
    "doctest", "io", "stat", "filecmp", "pickle", "shelve", "platform", "locale", "gettext",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--block-lines", type=int, default=20)
    ap.add_argument("--kind", choices=("doc", "source"), default="doc", help="pydoc plain text or Python source")
    args = ap.parse_args()
    overlap = sorted(set(TRAIN_MODULES) & set(PYDOC_MODULES))
    if overlap:
        raise SystemExit(f"training modules overlap the evaluation modules: {overlap}")
    if args.block_lines < 1:
        raise SystemExit(f"--block-lines={args.block_lines}: must be >= 1")
    blocks: list[str] = []
    for name in TRAIN_MODULES:
        mod = importlib.import_module(name)
        if args.kind == "source":
            if not str(getattr(mod, "__file__", "") or "").endswith(".py"):
                continue
            text = inspect.getsource(mod)
        else:
            text = "\n".join(pydoc_texts((name,)))  # rendered in a fresh interpreter, as the domain is
        lines = [line for line in text.splitlines() if line.strip()]
        blocks += ["\n".join(lines[i:i + args.block_lines]) for i in range(0, len(lines), args.block_lines)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"{len(TRAIN_MODULES)} modules, {len(blocks)} blocks, {args.out.stat().st_size / 1e6:.1f} MB -> {args.out}")


if __name__ == "__main__":
    main()
