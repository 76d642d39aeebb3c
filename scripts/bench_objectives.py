"""Compare finished runs on the validation splits of the training data, and on held-out text.

    python scripts/bench_objectives.py RUN_DIR [RUN_DIR ...] [--labels A B ...] [--windows 8]
                                       [--ratios 0.9 0.8 0.6] [--no-adapters] [--only A ...]

Validation domains (the ones a choice of settings may look at) come from the *training* data of the
candidates and are never trained on by any compared run:

* ``sg_val``: a fresh draw of the self-generated data (``conf/data/self_generated.yaml``'s sampler on
  the run's model with the same settings and another seed, ``--sg-val-seed``): the training data's
  distribution, sampled for validation. One such draw for every distinct sampler the compared runs
  trained on (``sg_chat_val`` for ``seed_text: chat``), so every candidate's training distribution
  is in the aggregate. (A run's own validation split of the self-generated data is
  not usable across runs: a ``data=mix`` run carves its split from the mixture, so it trains on most
  of what a ``data=self_generated`` run sets aside.)
* ``kjv_val``: the validation split that a run with the default ``eval`` settings sets aside from
  KJV's training verses (:func:`acip.train.data.validation_split`).

Every text that one of the compared runs trained on (its data group's training texts minus its
own validation split, re-created from its ``config.yaml``) is removed from the validation domains
before the windows are cut; the script prints how many. Held-out domains (measured only, never
trained on or used to choose): KJV's held-out split, Python ``pydoc`` text and Python
standard-library source code. Every run is evaluated on the same windows with ``pm.prune`` (what
``acip.export`` keeps; the trained masks are set to their scaling meanwhile, so the score map alone
decides which directions are active), with its adapters and, with ``--no-adapters``, without them
(LoRA B zeroed, so every layer is lifted as ``adapters=False``) and as the default export
(``auto``: per ratio, the run's recorded ``adapters="auto"`` decision). The validation aggregate is
the geometric mean of ppl / fp32 over every validation domain and all ratios; lower is better.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import random
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import acip
from acip.eval import perplexity, token_windows
from machine import machine_header  # scripts/machine.py

ROOT = Path(__file__).resolve().parents[1]
SRC_MODULES = ["textwrap", "csv", "fractions", "shlex", "heapq", "bisect"]


def _sg_in(cfg) -> list:
    """The self-generated data nodes a run config trains on (alone or as ``data=mix`` components)."""
    node = cfg.data
    if str(node.get("_target_", "")).endswith("sources.mix"):
        return [c.data for c in node.components.values() if str(c.data.get("_target_", "")).endswith("self_generated")]
    return [node] if str(node.get("_target_", "")).endswith("self_generated") else []


def _sg_name(node) -> str:
    """``sg_val`` for the sampler prompted from KJV (the first default), ``sg_<seed_text>_val`` otherwise."""
    st = node.get("seed_text", "kjv")
    return "sg_val" if st == "kjv" else f"sg_{st if isinstance(st, str) else 'files'}_val"


DISTRIBUTION = ("model", "seq_len", "temperature", "top_p", "top_k", "prompt_fraction", "prompt_tokens", "seed_text")


def _sg_nodes(runs: list[Path], seed: int = 0) -> list[tuple]:
    """Every distinct self-generated sampler the runs trained on, with the config around it (the first
    run's that uses it), in the order met; without any, ``conf/data/self_generated.yaml`` on SmolLM2
    with ``conf/compress.yaml``'s eval section."""
    out: dict[str, tuple] = {}
    seen: dict[str, str] = {}  # the sampler's settings (seed aside) -> its domain name
    for run in runs:
        cfg = OmegaConf.load(run / "config.yaml")
        for node in _sg_in(cfg):
            c = OmegaConf.to_container(node, resolve=True)
            key = json.dumps({k: c.get(k) for k in DISTRIBUTION}, sort_keys=True, default=str)
            if key in seen:
                continue
            name = _sg_name(node)
            if name in out:  # the same prompts with other settings: named by its prompted share
                name = f"{name[:-4]}_pf{float(node.get('prompt_fraction', 0.5)):g}_val"
            seen[key] = name
            out.setdefault(name, (node, cfg))
    if not out:
        cfg = OmegaConf.create({"seed": seed, "model": OmegaConf.load(ROOT / "conf/model/smollm2_135m.yaml"),
                                "data": OmegaConf.load(ROOT / "conf/data/self_generated.yaml"),
                                "eval": OmegaConf.load(ROOT / "conf/compress.yaml").eval})
        out["sg_val"] = (cfg.data, cfg)
    return [(name, node, cfg) for name, (node, cfg) in out.items()]


def _sg_node(runs: list[Path], seed: int = 0):
    """The first self-generated data node and its config (:func:`_sg_nodes`)."""
    _, node, cfg = _sg_nodes(runs, seed)[0]
    return node, cfg


def sg_validation_draw(runs: list[Path], seed: int, sequences: int = 64, node=None, cfg=None) -> list[str]:
    """``sequences`` fresh samples of a self-generated sampler (``node``; default the runs' first) with
    another ``seed`` (cached like any other draw): the same settings and model as that training data,
    never trained on."""
    if node is None:
        node, cfg = _sg_node(runs)
    if int(seed) == int(OmegaConf.select(cfg, "seed", default=0)) or int(seed) == int(node.get("seed", 0)):
        raise SystemExit(f"--sg-val-seed={seed} is the training data's own seed: choose another")
    draw = OmegaConf.merge(cfg, {})  # the node replaces the run's data (a data=mix run's included)
    draw.data = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    # prompts are given per batch (round(batches x prompt_fraction) of them): four batches, so that a
    # fraction of 0.5 prompts half the rows (one batch of 64 rows would have prompted none)
    draw.data.update({"seed": int(seed), "num_sequences": int(sequences), "heldout_fraction": 0.5, "teacher_topk": 0,
                      "batch_size": max(1, int(sequences) // 4)})
    train, held = instantiate(draw.data, _recursive_=False)
    texts = list(train) + list(held)
    random.Random(int(seed)).shuffle(texts)  # the windows are cut from the start: every batch's kind of row in them
    return texts


def domains(runs: list[Path], tok, sg_seed: int) -> dict[str, list[str]]:
    """Validation domains (one fresh draw per distinct self-generated sampler of the runs, and
    ``kjv_val``), each without any text a compared run trained on; then the held-out domains."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_quality import pydoc_texts, run_training_texts

    import importlib

    from acip.train.run import run_validation_split

    src = [inspect.getsource(importlib.import_module(m)) for m in SRC_MODULES]
    samplers = _sg_nodes(runs)
    train, held = acip.data.kjv_split()
    val = {name: sg_validation_draw(runs, sg_seed, node=node, cfg=cfg) for name, node, cfg in samplers}
    val["kjv_val"] = run_validation_split(samplers[0][2], list(train), tok)[1]
    seen: set[str] = set().union(*(set(run_training_texts(r, tok)) for r in runs))
    for d, texts in val.items():
        kept = [t for t in texts if t not in seen]
        print(f"{d}: {len(texts)} texts, {len(texts) - len(kept)} removed (trained on by a compared run)", flush=True)
        val[d] = kept
    VALIDATION[:] = list(val)
    return {**val, "kjv_heldout": list(held), "pydoc": pydoc_texts(), "pysrc": src}


VALIDATION = ["sg_val", "kjv_val"]  # the validation domains of this comparison (domains() sets them)


def sweep(pm, tok, wins: dict[str, torch.Tensor], ratios: list[float], adapters: bool) -> dict[str, dict[float, float]]:
    saved = []
    masks = [(l, l.mask.detach().clone()) for l in pm.svd_layers().values()]
    for l in pm.svd_layers().values():  # the trained masks would keep the run's stop ratio: the map decides
        l.mask.data.fill_(l.mask_scaling)
    if not adapters:
        for l in pm.svd_layers().values():
            if l.lora_B is not None:
                saved.append((l, l.lora_B.detach().clone()))
                l.lora_B.data.zero_()
    out: dict[str, dict[float, float]] = {d: {} for d in wins}
    try:
        for r in ratios:
            pm.prune(r, pm.score_map)
            for d, w in wins.items():
                out[d][r] = perplexity(pm, tok, w, batch_size=4, progress=False)
            print(f"  ratio {r}: " + ", ".join(f"{d} {out[d][r]:.2f}" for d in wins), flush=True)
    finally:
        pm.unprune()
        for l, b in saved:
            l.lora_B.data.copy_(b)
        for l, m in masks:
            l.mask.data.copy_(m)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--labels", nargs="+")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    ap.add_argument("--no-adapters", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sg-from", type=Path, help="take the self-generated sampler's settings from this run's config")
    ap.add_argument("--sg-val-seed", type=int, default=1000, help="seed of the fresh self-generated validation draw")
    ap.add_argument("--only", nargs="+", metavar="LABEL",
                    help="evaluate only these runs; every run given still shapes the domains, so two processes "
                         "with the same runs and different --only measure on the same windows (one per core)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine_header(("transformers", "acip")))
    labels = args.labels or [p.name for p in args.runs]
    from transformers import AutoTokenizer

    from acip.core.base import cache_dir

    acip.load_base("smollm2-135m")  # fills the cache (tokenizer included) on a fresh machine
    tok = AutoTokenizer.from_pretrained(str(cache_dir() / "smollm2-135m"))
    texts = domains(([args.sg_from] if args.sg_from else []) + list(args.runs), tok, args.sg_val_seed)
    wins = {d: token_windows(tok, t, args.seq_len, args.windows) for d, t in texts.items()}
    res: dict = {}
    fp32: dict[str, float] = {}
    if args.only and not set(args.only) <= set(labels):
        raise SystemExit(f"--only {sorted(set(args.only) - set(labels))}: not among the labels {labels}")
    for label, run in zip(labels, args.runs):
        if args.only and label not in args.only:
            continue
        pm = acip.load(run)
        if not fp32:
            with torch.no_grad(), pm.dense_view():
                fp32 = {d: perplexity(pm, tok, w, batch_size=4, progress=False) for d, w in wins.items()}
            print("fp32:", fp32, flush=True)
        print(label, flush=True)
        both = {}
        for ad in ([True, False] if args.no_adapters else [True]):
            key = label if ad else f"{label} (no adapters)"
            res[key] = both[ad] = sweep(pm, tok, wins, args.ratios, ad)
        if args.no_adapters and pm.has_trained_adapters():
            from acip.export.auto import decide_adapters

            pick = {r: decide_adapters(pm, pm.score_map, r) for r in args.ratios}
            res[f"{label} (auto: adapters at {', '.join(f'{r:g}' for r in args.ratios if pick[r]) or 'none'})"] = {
                d: {r: both[pick[r]][d][r] for r in args.ratios} for d in wins}
        del pm
    print(f"\n### {args.windows} windows x {args.seq_len} tokens per domain; ppl (x fp32)\n")
    doms = list(texts)
    print("| run | ratio | " + " | ".join(doms) + " |\n|---|---:|" + "---:|" * len(doms))
    print("| fp32 | 1.00 | " + " | ".join(f"{fp32[d]:.2f}" for d in doms) + " |")
    agg = {}
    for key, cols in res.items():
        for r in args.ratios:
            print(f"| {key} | {r:.2f} | " + " | ".join(f"{cols[d][r]:.2f} ({cols[d][r] / fp32[d]:.2f}x)" for d in doms) + " |")
        logs = [math.log(cols[d][r] / fp32[d]) for d in VALIDATION for r in args.ratios]
        agg[key] = math.exp(sum(logs) / len(logs))
    print("\n| run | validation aggregate (geo-mean ppl/fp32 over " + ", ".join(VALIDATION) + " x ratios) |\n|---|---:|")
    for key, v in agg.items():
        print(f"| {key} | {v:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"fp32": fp32, "runs": {k: {d: {str(r): v for r, v in c.items()} for d, c in cols.items()}
                                                               for k, cols in res.items()}, "aggregate": agg}, indent=1))


if __name__ == "__main__":
    main()
