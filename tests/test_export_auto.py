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
