"""Named held-out evaluation texts ("domains"), all of them offline and never trained on.

A run's final evaluation (``eval.domains``) and the benchmarks measure every domain at every
ratio, so a score map is judged on more than the text it was trained on. A domain is named by
one of:

* ``"heldout"``: the run's own data group's held-out split (the caller passes it; for the
  final evaluation it is the part of that split not used for validation);
* ``"kjv"``: the held-out 10% of the King James Bible (``acip.data.kjv_split``);
* ``"pydoc"``: Python's ``pydoc`` plain-text documentation of :data:`EVAL_MODULES`;
* ``"python_source"``: the Python source code of the same standard-library modules;
* ``{"name": "pydoc", "windows": 8}``: a built-in domain on its own number of windows (the final
  evaluation otherwise takes ``eval.max_windows`` of every domain);
* a mapping ``{"name": ..., "paths": [file, ...]}``: your own text files (``.txt``: paragraphs
  separated by blank lines; ``.jsonl``: one ``{"text": ...}`` per line), or ``{"name": ..., "texts": [...]}``.

:data:`EVAL_MODULES` equals ``scripts/bench_quality.py``'s ``PYDOC_MODULES`` and is disjoint from
the modules of the training corpus ``scripts/pydoc_corpus.py`` writes (a test checks both), so a
run trained on pydoc text is still measured on documentation it never saw.
"""
from __future__ import annotations

import importlib
import inspect
from functools import lru_cache
from typing import Any, Mapping, Sequence

__all__ = ["EVAL_MODULES", "DEFAULT_DOMAINS", "BUILTIN_DOMAINS", "domain_texts", "resolve_domains", "check_domains",
           "pydoc_texts", "python_source_texts"]

EVAL_MODULES = ("json", "re", "collections", "itertools", "functools", "pathlib", "argparse",
                "logging", "subprocess", "dataclasses", "typing", "string", "textwrap", "csv")
DEFAULT_DOMAINS = ("heldout", "pydoc", "python_source")
BUILTIN_DOMAINS = ("heldout", "kjv", "pydoc", "python_source")


_RENDER_PYDOC = """
import importlib, json, pydoc, re, sys
out = []
for name in sys.argv[1:]:
    text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
    text = re.sub(r"0x[0-9a-fA-F]{6,}", "0x0", text)  # object addresses ("<WeakSet at 0x7f..>") vary per process
    out += [line for line in text.splitlines() if line.strip()]
sys.stdout.write(json.dumps(out))
"""


@lru_cache(maxsize=None)
def _pydoc(modules: tuple[str, ...]) -> tuple[str, ...]:
    """The rendering happens in a fresh, isolated interpreter (``python -I``): pydoc documents a
    class with every attribute it has *now*, and libraries patch standard classes at import
    (transformers adds ``warning_once`` and four more methods to ``logging.Logger``), so rendered
    in this process the text would depend on what had been imported before. Object addresses in
    the text (module-level objects shown by their repr) are written as ``0x0``: they differ in
    every process."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-I", "-c", _RENDER_PYDOC, *modules], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"rendering the pydoc text of {list(modules)} failed in a fresh interpreter "
                           f"({sys.executable} -I): {proc.stderr.strip()[-500:]}")
    return tuple(json.loads(proc.stdout))


@lru_cache(maxsize=None)
def _source(modules: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for name in modules:
        mod = importlib.import_module(name)
        if getattr(mod, "__file__", None) is None or not str(mod.__file__).endswith(".py"):
            continue  # a built-in or compiled module has no source (itertools)
        out += inspect.getsource(mod).splitlines()
    return tuple(out)


def _read_file(path: Any) -> list[str]:
    """Paragraphs of a ``.txt`` (blank-line separated) or the ``text`` fields of a ``.jsonl``."""
    import json
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"eval.domains: no file at {str(p)!r}")
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        return [str(json.loads(line)["text"]) for line in raw.splitlines() if line.strip()]
    return [b.strip() for b in raw.split("\n\n") if b.strip()]


def pydoc_texts(modules: Sequence[str] = EVAL_MODULES) -> list[str]:
    """Non-empty lines of the ``pydoc`` plain-text documentation of ``modules``, rendered in a fresh
    interpreter: the same text for one Python whatever this process has imported."""
    return list(_pydoc(tuple(modules)))


def python_source_texts(modules: Sequence[str] = EVAL_MODULES) -> list[str]:
    """Lines of the source files of ``modules`` (built-in modules without a ``.py`` file are skipped)."""
    return list(_source(tuple(modules)))


def domain_texts(spec: Any, heldout_texts: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """``(name, texts)`` of one domain spec (a built-in name or a mapping; see the module docstring)."""
    if isinstance(spec, Mapping):
        spec = dict(spec)
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"eval.domains: a mapping needs a non-empty 'name', got {spec!r}")
        if "texts" in spec:
            texts = [str(t) for t in spec["texts"]]
        elif "paths" in spec:
            texts = [t for p in spec["paths"] for t in _read_file(p)]
        elif name in BUILTIN_DOMAINS:
            return domain_texts(name, heldout_texts)
        else:
            raise ValueError(f"eval.domains: {name!r} needs 'paths' (text files) or 'texts'")
        if not texts:
            raise ValueError(f"eval.domains: {name!r} holds no text")
        return name, texts
    if not isinstance(spec, str):
        raise TypeError(f"eval.domains: each item is a name or a mapping, got {type(spec).__name__}")
    if spec == "heldout":
        if not heldout_texts:
            raise ValueError("eval.domains: 'heldout' is the data group's held-out split, and it is empty here")
        return spec, list(heldout_texts)
    if spec == "kjv":
        from acip.data import kjv_split

        return spec, kjv_split()[1]
    if spec == "pydoc":
        return spec, pydoc_texts()
    if spec == "python_source":
        return spec, python_source_texts()
    raise ValueError(f"eval.domains: unknown domain {spec!r}; built-in: {', '.join(BUILTIN_DOMAINS)}, or "
                     f"{{name: ..., paths: [...]}} for text files")


def check_domains(specs: Sequence[Any]) -> list[str]:
    """The names of ``specs``, checked without reading any text (unknown names, missing files, duplicates)."""
    from pathlib import Path

    if isinstance(specs, (str, Mapping)):
        specs = [specs]
    names: list[str] = []
    for spec in specs:
        if isinstance(spec, Mapping):
            name = spec.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"eval.domains: a mapping needs a non-empty 'name', got {dict(spec)!r}")
            for path in spec.get("paths") or []:
                if not Path(path).expanduser().is_file():
                    raise FileNotFoundError(f"eval.domains: {name!r}: no file at {str(path)!r}")
            if "paths" not in spec and "texts" not in spec and name not in BUILTIN_DOMAINS:
                raise ValueError(f"eval.domains: {name!r} needs 'paths' (text files) or 'texts'")
            w = spec.get("windows")
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                raise ValueError(f"eval.domains: {name!r}: windows must be an integer >= 1, got {w!r}")
            unknown = set(spec) - {"name", "paths", "texts", "windows"}
            if unknown:
                raise ValueError(f"eval.domains: {name!r}: unknown keys {sorted(unknown)} (name, paths, texts, windows)")
        elif isinstance(spec, str):
            if spec not in BUILTIN_DOMAINS:
                raise ValueError(f"eval.domains: unknown domain {spec!r}; built-in: {', '.join(BUILTIN_DOMAINS)}, "
                                 f"or {{name: ..., paths: [...]}} for text files")
            name = spec
        else:
            raise TypeError(f"eval.domains: each item is a name or a mapping, got {type(spec).__name__}")
        if name in names:
            raise ValueError(f"eval.domains: {name!r} is named twice")
        names.append(name)
    if not names:
        raise ValueError("eval.domains is empty: name at least one domain (e.g. [heldout])")
    return names


def resolve_domains(specs: Sequence[Any], heldout_texts: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{name: texts}`` in the given order; names must be unique."""
    if isinstance(specs, (str, Mapping)):
        specs = [specs]
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, texts = domain_texts(spec, heldout_texts)
        if name in out:
            raise ValueError(f"eval.domains: {name!r} is named twice")
        out[name] = texts
    if not out:
        raise ValueError("eval.domains is empty: name at least one domain (e.g. [heldout])")
    return out
