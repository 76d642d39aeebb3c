"""ACIPModel.at_ratio: inside the block the parametrized model computes its export at that ratio."""
from __future__ import annotations

import torch

import acip
from helpers_train import tiny_pm


def _trained_looking(lora=None):
    pm = tiny_pm(lora=lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # masks as after training: many directions <= 0, scores from the masks
        for m in pm.mask_parameters():
            m.copy_(torch.randn(m.shape, generator=g))
        for p in pm.lora_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    pm.score_map = acip.ScoreMap.from_masks(pm)
    return pm, torch.randint(0, 50, (2, 12), generator=g)


def test_at_ratio_is_the_export_even_above_the_masks_ratio_and_restores_everything():
    pm, ids = _trained_looking()
    assert pm.size_ratio() < 0.7
    masks = {n: m.detach().clone() for n, m in pm.masks().items()}
    with torch.no_grad():
        for r in (0.95, 0.7, 0.4):
            ref = acip.export(pm, r)(input_ids=ids).logits
            with pm.at_ratio(r) as ranks:
                got = pm(input_ids=ids).logits
                assert ranks == pm.active_ranks()
            assert torch.allclose(got, ref, atol=1e-5), r
            pm.prune(r)  # prune alone keeps masked-off directions off: not the export above 0.56
            plain = pm(input_ids=ids).logits
            pm.unprune()
            assert torch.allclose(plain, ref, atol=1e-5) == (r < pm.size_ratio())
    assert all(torch.equal(m, masks[n]) for n, m in pm.masks().items())
    assert all(l.keep is None for l in pm.svd_layers().values())


def test_at_ratio_nests_and_trains_adapters_inside_the_block():
    pm, ids = _trained_looking(lora={"r": 2, "lora_alpha": 4})
    pm.prune(0.8)
    outer = {n: l.keep.clone() for n, l in pm.svd_layers().items()}
    with pm.at_ratio(0.5):
        loss = pm(input_ids=ids).logits.square().mean()
        loss.backward()
    assert all(torch.equal(l.keep, outer[n]) for n, l in pm.svd_layers().items())  # the outer pruning is back
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in pm.lora_parameters()[1::2])
    pm.unprune()


def test_ratio_sweep_measures_the_export_above_the_masks_ratio():
    """acip.eval.ratio_sweep's figure at a ratio is the exported model's perplexity there, also at
    ratios above the one the masks were trained to (where ``prune`` alone keeps fewer directions)."""
    from acip.eval import perplexity, ratio_sweep

    pm, ids = _trained_looking()
    windows = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(2))
    ratios = (0.95, 0.8, 0.4)
    assert pm.size_ratio() < 0.8  # 0.95 and 0.8 lie above the masks' own ratio
    got = ratio_sweep(pm, pm.score_map, None, windows, ratios)
    for r in ratios:
        ref = perplexity(acip.export(pm, r), None, windows)
        assert abs(got[r] - ref) <= 1e-4 * ref, (r, got[r], ref)
    assert all(l.keep is None for l in pm.svd_layers().values())
