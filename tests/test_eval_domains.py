"""eval.domains: named held-out texts, the final evaluation over several domains, its plots."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from acip.eval.domains import (BUILTIN_DOMAINS, DEFAULT_DOMAINS, EVAL_MODULES, check_domains, domain_texts,
                               resolve_domains)
from acip.eval.sweep import format_table, plot_domain_curves

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _module(path: Path):
    import sys

    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(path.parent))


def test_eval_modules_are_the_benchmarks_and_never_the_training_corpus():
    corpus = _module(SCRIPTS / "pydoc_corpus.py")
    assert not set(EVAL_MODULES) & set(corpus.TRAIN_MODULES)
    assert tuple(_module(SCRIPTS / "bench_quality.py").PYDOC_MODULES) == EVAL_MODULES


def test_builtin_domains_resolve_in_order_with_text():
    held = ["first held-out verse", "second"]
    got = resolve_domains(["heldout", "pydoc", "python_source", "kjv"], held)
    assert list(got) == ["heldout", "pydoc", "python_source", "kjv"] and got["heldout"] == held
    assert any("json" in line.lower() for line in got["pydoc"][:50])
    assert any(line.startswith(("import ", "def ", "class ")) for line in got["python_source"])
    assert all(got[d] for d in got) and set(DEFAULT_DOMAINS) <= set(BUILTIN_DOMAINS)


def test_file_and_text_domains_and_errors(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("a paragraph\n\nanother one\n")
    j = tmp_path / "mine.jsonl"
    j.write_text('{"text": "x"}\n{"text": "y"}\n')
    got = resolve_domains([{"name": "mine", "paths": [str(f), str(j)]}, {"name": "inline", "texts": ["t"]}])
    assert got == {"mine": ["a paragraph", "another one", "x", "y"], "inline": ["t"]}
    assert check_domains(["heldout", {"name": "mine", "paths": [str(f)]}]) == ["heldout", "mine"]
    with pytest.raises(ValueError, match="unknown domain 'wiki'"):
        check_domains(["wiki"])
    with pytest.raises(ValueError, match="named twice"):
        check_domains(["pydoc", "pydoc"])
    with pytest.raises(FileNotFoundError, match="nothere"):
        check_domains([{"name": "x", "paths": [str(tmp_path / "nothere.txt")]}])
    with pytest.raises(ValueError, match="empty"):
        domain_texts("heldout", [])


def test_final_evaluation_refuses_a_bad_domain_before_training(tmp_path):
    from acip.train.callbacks.final_eval import FinalEvaluation

    with pytest.raises(ValueError, match="unknown domain"):
        FinalEvaluation(tmp_path, None, ["a", "b"], domains=["heldout", "wikipedia"], val_texts=["v"])
    with pytest.raises(ValueError, match="name the validation split"):
        FinalEvaluation(tmp_path, None, ["a", "b"], domains=[{"name": "val", "texts": ["x"]}], val_texts=["v"])
    # the validation split is given (set aside from the training texts); the held-out split is reported whole
    ev = FinalEvaluation(tmp_path, None, [str(i) for i in range(10)], val_texts=["v1", "v2"])
    assert ev.val_texts == ["v1", "v2"] and ev.heldout_texts == [str(i) for i in range(10)]
    with pytest.raises(ValueError, match="needs the validation split"):
        FinalEvaluation(tmp_path, None, ["a", "b"])
    with pytest.raises(ValueError, match="windows must be"):
        FinalEvaluation(tmp_path, None, ["a", "b"], domains=[{"name": "pydoc", "windows": 0}], val_texts=["v"])


def test_validation_split_comes_from_the_training_texts():
    from acip.train.data import validation_split
    from acip.train.models import byte_tokenizer

    tok = byte_tokenizer()
    texts = [f"verse {i:03d} " + "x" * (i % 7) for i in range(200)]  # ~12-18 byte tokens each
    rest, val = validation_split(texts, tok, 100, max_fraction=0.1, seed=3)
    assert set(rest).isdisjoint(val) and sorted(rest + val) == sorted(texts)  # nothing lost, nothing shared
    assert [t for t in texts if t in set(val)] == val and [t for t in texts if t in set(rest)] == rest  # text order
    n_val = sum(len(tok(t + "\n", add_special_tokens=False)["input_ids"]) for t in val)
    assert 100 <= n_val < 100 + 20  # just enough tokens: stops at the first text that reaches them
    assert validation_split(texts, tok, 100, max_fraction=0.1, seed=3) == (rest, val)  # seeded
    assert validation_split(texts, tok, 100, max_fraction=0.1, seed=4)[1] != val
    assert min(int(t[6:9]) for t in val) < 150 < max(int(t[6:9]) for t in val) or len(val) < 4  # drawn at random
    rest, val = validation_split(texts, tok, 10**6, max_fraction=0.05, seed=0)  # capped at 5% of the texts
    assert len(val) == 10 and len(rest) == 190
    rest, val = validation_split(["a", "b"], tok, 10**6, max_fraction=0.1)  # always leaves one to train on
    assert len(val) == 1 and len(rest) == 1
    with pytest.raises(ValueError, match="val_max_fraction"):
        validation_split(texts, tok, 100, max_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        validation_split(["only"], tok, 100)


def test_validation_split_of_a_stream_skips_its_rows():
    from acip.train.data import TextStream, validation_split
    from acip.train.models import byte_tokenizer

    rows = [{"text": f"row {i:02d}" if i % 5 else ""} for i in range(40)]  # every 5th row empty

    class Split(list):
        def skip(self, n):
            return Split(self[n:])

    stream = TextStream(lambda: Split(rows), skip=3)
    rest, val = validation_split(stream, byte_tokenizer(), 20)
    assert val == ["row 03", "row 04", "row 06"]  # file order after the held-out rows; empty rows skipped
    assert rest.skip == 3 + 4 and stream.skip == 3  # the rows read (the empty one too); the original untouched
    assert list(rest)[0] == "row 07" and not set(val) & set(rest)


def test_each_domain_gets_its_own_windows(tmp_path):
    from acip.train.callbacks.final_eval import FinalEvaluation
    from acip.train.models import byte_tokenizer

    held = [f"verse {i} of the held-out split, long enough for a window" for i in range(40)]
    val = [f"validation text {i}, set aside from the training data" for i in range(20)]
    ev = FinalEvaluation(tmp_path, byte_tokenizer(), held, seq_len=16, max_windows=5, val_texts=val,
                         domains=["heldout", {"name": "pydoc", "windows": 2}, {"name": "x", "texts": ["y" * 200]}])
    wins = ev.windows()
    assert list(wins) == ["val", "heldout", "pydoc", "x"]
    assert [len(w) for w in wins.values()] == [5, 5, 2, 5] and wins["val"].shape[1] == 16


def test_multi_domain_evaluation_exports_once_per_ratio():
    import acip
    from acip.train.callbacks.final_eval import evaluate_score_maps
    from helpers_train import tiny_pm

    pm = tiny_pm(lora={"r": 2, "lora_alpha": 4})
    sv = acip.ScoreMap.from_singular_values(pm)
    wins = {"a": torch.randint(0, 50, (2, 8)), "b": torch.randint(0, 50, (3, 8))}
    ev = evaluate_score_maps({"sv": (sv, {"adapters": False})}, wins, [1.0, 0.5], pm, log=lambda *_: None)
    assert set(ev["ppl"]) == {"a", "b"} and set(ev["ppl"]["a"]["sv"]) == {1.0, 0.5}
    single = evaluate_score_maps({"sv": (sv, {"adapters": False})}, wins["b"], [0.5], pm, log=lambda *_: None)
    assert single["ppl"]["sv"][0.5] == pytest.approx(ev["ppl"]["b"]["sv"][0.5])
    assert ev["adapters"]["sv"] == {1.0: False, 0.5: False}


def test_table_notes_and_a_readable_plot_when_a_baseline_is_a_million_times_worse(tmp_path):
    r = [0.9, 0.8, 0.5]
    table = format_table({"acip": dict(zip(r, [20.0, 25.0, 70.0]))}, reference=15.0, ratios=r,
                         notes={"acip adapters": {0.9: "off", 0.8: "off", 0.5: "on"}})
    lines = table.splitlines()
    assert lines[0] == "| ratio | acip | acip adapters |" and lines[2] == "| dense | 15.00 |  |"
    assert lines[-1] == "| 0.50 | 70.00 | on |"
    doms = {"heldout": {"acip": dict(zip(r, [20.0, 25.0, 70.0])), "sv": dict(zip(r, [3e3, 1e7, math.inf]))},
            "pydoc": {"acip": dict(zip(r, [12.0, 18.0, 150.0]))}}
    png = plot_domain_curves(doms, tmp_path / "p.png", references={"heldout": 15.0, "pydoc": 9.0})
    assert png.read_bytes()[:4] == b"\x89PNG"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from acip.eval.sweep import _draw

    fig, ax = plt.subplots()
    note = _draw(ax, doms["heldout"], 15.0, 30.0)
    lo, hi = ax.get_ylim()
    assert "clipped" in note and hi < 15.0 * 30 * 1.5 and lo < 20  # the good curve keeps most of the axis
    plt.close(fig)


def test_kept_rank_heatmap_groups_blocks_and_module_types(tmp_path):
    from acip.train.plots import block_and_type, plot_kept_ranks

    assert block_and_type("model.layers.12.mlp.gate_proj") == (12, "gate")
    assert block_and_type("model.layers.3.self_attn.q_proj") == (3, "q")
    names = [f"model.layers.{b}.{m}" for b in range(3) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    full = {n: 16 for n in names}
    ranks = {0.8: {n: 12 for n in names}, 0.5: {n: 4 for n in names}}
    png = plot_kept_ranks(ranks, full, tmp_path / "k.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_pydoc_text_does_not_depend_on_what_the_process_imported(monkeypatch):
    """pydoc documents a class with the attributes it has now; libraries patch standard classes at
    import (transformers adds methods to logging.Logger), so the domain renders in a fresh interpreter."""
    import logging

    from acip.eval import domains

    domains._pydoc.cache_clear()
    before = domains.pydoc_texts(("logging",))
    monkeypatch.setattr(logging.Logger, "acip_patched_method", lambda self: None, raising=False)
    import pydoc

    assert "acip_patched_method" in pydoc.render_doc(logging, renderer=pydoc.plaintext)  # in-process: it leaks
    domains._pydoc.cache_clear()
    after = domains.pydoc_texts(("logging",))
    assert after == before and not any("acip_patched_method" in line for line in after)
    assert any("class Logger" in line for line in after)
    domains._pydoc.cache_clear()
