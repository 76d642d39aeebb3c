"""export(adapters="auto"): the run's recorded per-ratio choice, the nearest measured ratio at or
below, the fallbacks, and the record surviving save_pretrained / a run directory."""
import pytest
import torch
from conftest import tiny_model

import acip
from acip.core import ScoreMap
from acip.export.auto import AUTO_KEY, decide_adapters, record_decision


def _trained_pm():
    pm = acip.parametrize(tiny_model("llama"), lora={"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.lora_B.normal_(std=0.05)
    pm.score_map = ScoreMap.from_masks(pm, method="acip")
    return pm


def test_auto_follows_the_recorded_decision(tmp_path):
    pm = _trained_pm()
    assert acip.export(pm, 0.7).config.acip_export["adapters"] is True  # nothing recorded: as in the paper
    dec = record_decision(pm.score_map, {0.9: {"adapters": 9.0, "no_adapters": 5.0},
                                         0.6: {"adapters": 7.0, "no_adapters": 8.0}})
    assert dec == {"0.9": False, "0.6": True} and pm.score_map.meta[AUTO_KEY] == dec
    used = {r: acip.export(pm, r).config.acip_export["adapters"] for r in (0.95, 0.9, 0.8, 0.6, 0.5)}
    assert used == {0.95: False, 0.9: False, 0.8: True, 0.6: True, 0.5: True}
    assert decide_adapters(pm, pm.score_map, None) is False  # a byte budget: only if every ratio says so
    # forcing still works, and the auto export at 0.9 is exactly the forced adapters=False one
    assert acip.export(pm, 0.9, adapters=True).config.acip_export["adapters"] is True
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        a, b = acip.export(pm, 0.9)(ids).logits, acip.export(pm, 0.9, adapters=False)(ids).logits
    assert torch.equal(a, b)
    pm.save_pretrained(tmp_path / "run")  # the decision travels with the run directory
    for r, want in ((0.9, False), (0.6, True)):
        got = acip.export(tmp_path / "run", r, model=tiny_model("llama"))
        assert got.config.acip_export["adapters"] is want


def test_auto_without_trained_adapters_and_errors():
    pm = acip.parametrize(tiny_model("llama"), lora={"r": 2, "lora_alpha": 4})  # B == 0: nothing trained
    sm = ScoreMap.from_singular_values(pm)
    assert acip.export(pm, 0.7, score_map=sm).config.acip_export["adapters"] is False
    with pytest.raises(TypeError, match="auto"):
        acip.export(pm, 0.7, score_map=sm, adapters="yes")


def test_a_mixture_keeps_the_adapters_only_where_every_component_gains():
    from acip.export.auto import PARTS_KEY, VAL_KEY

    pm = _trained_pm()
    pooled = {0.9: {"adapters": 5.0, "no_adapters": 6.0}, 0.6: {"adapters": 7.0, "no_adapters": 8.0}}
    parts = {"chat": {0.9: {"adapters": 4.0, "no_adapters": 5.5}, 0.6: {"adapters": 6.0, "no_adapters": 7.5}},
             "kjv": {0.9: {"adapters": 9.0, "no_adapters": 8.0}, 0.6: {"adapters": 9.0, "no_adapters": 9.5}}}
    dec = record_decision(pm.score_map, pooled, parts)  # the pooled split alone would keep them at 0.9
    assert dec == {"0.9": False, "0.6": True}
    assert pm.score_map.meta[PARTS_KEY]["kjv"]["0.9"] == {"adapters": 9.0, "no_adapters": 8.0}
    assert pm.score_map.meta[VAL_KEY]["0.9"] == {"adapters": 5.0, "no_adapters": 6.0}
    assert acip.export(pm, 0.9).config.acip_export["adapters"] is False
    # the pooled split still has its say: a gain on every part but a loss pooled keeps them out
    assert record_decision(pm.score_map, {0.6: {"adapters": 9.0, "no_adapters": 8.0}},
                           {"chat": {0.6: {"adapters": 1.0, "no_adapters": 2.0}}}) == {"0.6": False}
    assert record_decision(pm.score_map, pooled) == {"0.9": True, "0.6": True}  # no parts: the pooled rule
    assert PARTS_KEY not in pm.score_map.meta  # no stale per-part figures beside a pooled decision
    with pytest.raises(ValueError, match="'kjv'.*0.6"):
        record_decision(pm.score_map, pooled, {"kjv": {0.9: {"adapters": 1.0, "no_adapters": 2.0}}})


def test_the_final_evaluation_measures_each_component_and_decides_on_all(tmp_path, monkeypatch):
    """FinalEvaluation on a mixture's validation split: windows per component, the decision on every
    component, column ``acip`` following it, and the per-part table in results.json."""
    import json
    from types import SimpleNamespace

    from acip.export.auto import PARTS_KEY
    from acip.train import models
    from acip.train.callbacks import final_eval
    from acip.train.data import LabeledTexts

    model, tok = models.tiny_llama(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1)
    pm = acip.parametrize(model, lora={"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for l in pm.svd_layers().values():
            l.lora_B.normal_(std=0.05)
    pm.score_map = ScoreMap.from_masks(pm, method="acip")
    val = LabeledTexts([f"{k}: validation text number {i}, long enough" for i in range(12) for k in ("chat", "kjv")],
                       [k for _ in range(12) for k in ("chat", "kjv")])
    held = [f"held-out verse {i} of the data group, long enough for windows" for i in range(20)]
    ev = final_eval.FinalEvaluation(tmp_path, tok, held, ratios=[0.9, 0.6], seq_len=16, max_windows=3,
                                    baseline=False, val_texts=val, domains=["heldout"])
    assert list(ev.windows()) == ["val", "val/chat", "val/kjv", "heldout"]
    real = final_eval.evaluate_score_maps

    def rigged(maps, wins, ratios, pm_, log=print):  # the real exports; the validation figures set by hand
        out = real(maps, wins, ratios, pm_, log=log)
        for d, a, n in (("val", 5.0, 6.0), ("val/chat", 4.0, 5.0), ("val/kjv", 9.0, 8.0)):
            if d in out["ppl"] and "acip_adapters" in out["ppl"][d]:
                out["ppl"][d]["acip_adapters"] = {0.9: a, 0.6: a}
                out["ppl"][d]["acip_no_adapters"] = {0.9: n, 0.6: n if d != "val/kjv" else 10.0}
        return out

    monkeypatch.setattr(final_eval, "evaluate_score_maps", rigged)
    trainer = SimpleNamespace(is_global_zero=True, global_step=7, world_size=1, loggers=[])
    module = SimpleNamespace(pm=pm, score_map=pm.score_map, rank_digests=["d"],
                             schedule=SimpleNamespace(stop_ratio=0.5, stop_step=5, post_tune_done=lambda s: 0))
    res = ev.run(trainer, module)
    assert res["adapters_auto"] == {"0.9": False, "0.6": True}  # kjv loses at 0.9, every part gains at 0.6
    assert set(res["val_ppl_by_part"]) == {"chat", "kjv"} and res["domains"] == ["heldout"]
    assert res["val_ppl_by_part"]["kjv"]["acip"] == {"0.9": 8.0, "0.6": 9.0}  # column acip follows the decision
    assert res["eval"]["windows"]["val/chat"] >= 1 and res["eval"]["windows"]["val/kjv"] >= 1
    saved = ScoreMap.load(tmp_path / "score_map.safetensors")
    assert saved.meta["adapters_auto"] == {"0.9": False, "0.6": True} and set(saved.meta[PARTS_KEY]) == {"chat", "kjv"}
    assert json.loads((tmp_path / "results.json").read_text())["adapters_auto"] == res["adapters_auto"]
    with pytest.raises(ValueError, match="validation split and its parts"):
        final_eval.FinalEvaluation(tmp_path, tok, held, val_texts=val, domains=[{"name": "val/x", "texts": ["y"]}])
