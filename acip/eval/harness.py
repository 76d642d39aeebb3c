"""``acip.eval.lm_eval(model, tokenizer, tasks=[...])``: EleutherAI's lm-evaluation-harness on an exported model.

An export is a plain transformers model, so it goes to the harness as an already-built
``HFLM(pretrained=model, tokenizer=tokenizer)``; nothing is saved or reloaded. The harness is an
optional dependency (``pip install "acip[eval]"``, i.e. ``lm-eval``; its ``hf`` extra is not needed
because torch, transformers, accelerate and peft come from acip's own environment).

Tasks come from the harness's registry or from your own YAML files: ``include_path=`` a directory
(or a list) of task YAMLs, or pass a ``.yaml`` file as a task and its directory is included and
its ``task:`` name used. The harness downloads the datasets of its built-in tasks from the hub;
offline, use tasks whose YAML reads local files (``dataset_path: json`` with
``dataset_kwargs: {data_files: {test: /path/data.jsonl}}``), as the tests do.

    small = acip.export("<run_dir>", 0.6)
    res = acip.eval.lm_eval(small, tok, tasks=["hellaswag"], limit=100)   # with network or a warm cache
    res["results"]["hellaswag"]["acc,none"]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["lm_eval", "LMEvalMissingError"]

INSTALL_HINT = ('the evaluation-harness hook needs the PyPI package lm-eval: pip install "acip[eval]" '
                '(or pip install lm-eval; it does not pin torch)')


class LMEvalMissingError(ImportError):
    """lm-eval is not installed; the message says how to install it."""


def _import() -> Any:
    try:
        import lm_eval as harness
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LMEvalMissingError(f"{INSTALL_HINT} ({e})") from None
    return harness, HFLM, TaskManager


def _task_names(tasks: Sequence[Any], include: list[str]) -> list[Any]:
    """Task names; a ``.yaml`` path adds its folder to ``include`` and stands for its ``task:`` name."""
    import yaml

    out: list[Any] = []
    for t in tasks:
        p = Path(str(t)).expanduser() if isinstance(t, (str, Path)) else None
        if p is not None and p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise FileNotFoundError(f"no task file at {str(p)!r}")
            name = (yaml.safe_load(p.read_text()) or {}).get("task")
            if not isinstance(name, str):
                raise ValueError(f"{str(p)!r} names no task (its 'task:' key)")
            include.append(str(p.parent.resolve()))
            out.append(name)
        else:
            out.append(t)
    return out


def lm_eval(model: Any, tokenizer: Any, tasks: Sequence[Any] | str, *, include_path: str | Path | Sequence[Any] | None = None,
            num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 8,
            device: str | None = None, max_length: int | None = None, log_samples: bool = False,
            builtin_tasks: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Run ``lm_eval.simple_evaluate`` on ``model`` (an exported model; an :class:`ACIPModel` gives its
    wrapped model) and return its result dict (``res["results"][task]["acc,none"]``, ...).

    ``builtin_tasks=False`` indexes only ``include_path`` / the given YAML files, not the harness's
    few thousand built-in tasks (faster). ``kwargs`` go to ``simple_evaluate`` (e.g.
    ``bootstrap_iters=0``, ``random_seed=``). Raises
    :class:`LMEvalMissingError` (an ``ImportError``) naming the fix when lm-eval is not installed,
    and ``ValueError`` when no task is given or a name is unknown to the harness.
    """
    harness, HFLM, TaskManager = _import()
    if isinstance(tasks, (str, Path)):
        tasks = [tasks]
    if not tasks:
        raise ValueError("tasks is empty: name at least one lm-eval task (or a task .yaml file)")
    if tokenizer is None:
        raise ValueError("lm_eval needs the model's tokenizer (acip.load_base(...)[1], or the export directory's)")
    inner = model.model if hasattr(model, "svd_layers") and hasattr(model, "model") else model
    include: list[str] = []
    if include_path is not None:
        include += [str(Path(p).expanduser().resolve()) for p in
                    ([include_path] if isinstance(include_path, (str, Path)) else include_path)]
    names = _task_names(list(tasks), include)
    if not builtin_tasks and not include:
        raise ValueError("builtin_tasks=False needs include_path= (or task .yaml files) to find tasks in")
    manager = TaskManager(include_path=include or None, include_defaults=bool(builtin_tasks))
    known = set(manager.all_tasks)
    unknown = [n for n in names if isinstance(n, str) and n not in known]
    if unknown:
        raise ValueError(f"lm-eval does not know the task(s) {unknown}: check the names (lm-eval ls tasks) or pass "
                         f"include_path= the folder of their YAML files")
    lm_kw: dict[str, Any] = {"batch_size": batch_size,
                             "device": device or str(next(inner.parameters()).device)}  # the model's own device
    if max_length is not None:
        lm_kw["max_length"] = int(max_length)
    was_training = inner.training
    inner.eval()
    try:
        lm = HFLM(pretrained=inner, tokenizer=tokenizer, **lm_kw)
        res = harness.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples, **kwargs)
    finally:
        inner.train(was_training)
    if res is None:  # a non-zero rank of a distributed run
        return {}
    return dict(res)
