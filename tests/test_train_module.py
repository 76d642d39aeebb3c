"""The LightningModule: loss formula, what trains and what stays frozen."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from acip.train.data import PackedTextDataModule
from acip.train.models import byte_tokenizer
from acip.train.module import ACIPModule, NonFiniteLossError
from acip.train.schedule import ACIPSchedule
from helpers_train import tiny_pm


def tiny_data(steps: int) -> PackedTextDataModule:
    """Packed text whose byte ids are folded into tiny_pm's 50-token vocabulary."""
    texts = [f"line {i} of some training text for the tiny model" for i in range(300)]
    dm = PackedTextDataModule(byte_tokenizer(), texts, seq_len=16, batch_size=2, total_steps=steps)
    dm.sequences = dm.prepare() % 50
    return dm


def fit(module: ACIPModule, steps: int) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=tiny_data(steps))


def test_loss_is_ce_plus_l1_weight_times_relu_mask_sum():
    pm = tiny_pm()
    module = ACIPModule(pm, lr=1e-3, lora_lr=1e-3, schedule=ACIPSchedule(l1_init=0.5))
    ids = torch.randint(0, 50, (2, 8))
    logits = pm(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    l1 = sum(torch.relu(m).sum() for m in pm.mask_parameters())
    loss = module.training_step({"input_ids": ids}, 0)
    assert float(loss) == pytest.approx(float(ce + 0.5 * l1), rel=1e-5)
    assert module.last["l1_loss"] == pytest.approx(0.02 * sum(m.numel() for m in pm.mask_parameters()), rel=1e-5)
    assert module.last["l1_weight"] == 0.5
    module.schedule.phase = "post_tune"
    assert float(module.training_step({"input_ids": ids}, 0)) == pytest.approx(float(ce), rel=1e-5)


def test_only_masks_and_lora_train_everything_else_stays_bit_identical():
    pm = tiny_pm(lora={"r": 2, "lora_alpha": 4})
    module = ACIPModule(pm, lr=5e-3, lora_lr=5e-3, schedule=ACIPSchedule(l1_init=1e-2))
    trainable = {id(p) for p in pm.mask_parameters() + pm.lora_parameters()}
    assert {id(p) for p in pm.parameters() if p.requires_grad} == trainable
    frozen = {n: t.detach().clone() for n, t in list(pm.named_parameters()) + list(pm.named_buffers())
              if id(t) not in trainable}
    masks0 = [m.detach().clone() for m in pm.mask_parameters()]
    lora_b0 = [p.detach().clone() for p in pm.lora_parameters()]
    fit(module, steps=4)
    after = dict(list(pm.named_parameters()) + list(pm.named_buffers()))
    assert all(torch.equal(after[n], t) for n, t in frozen.items()), "a frozen tensor changed"
    assert any(not torch.equal(a, b) for a, b in zip(masks0, pm.mask_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(lora_b0, pm.lora_parameters()))
    opt = module.trainer.optimizers[0]
    assert [g["name"] for g in opt.param_groups] == ["masks", "lora"] and opt.param_groups[0]["weight_decay"] == 0.0
    assert module.schedule.updates == 4 and module.rank_digests == [module.score_map.digest()[:15]]


def test_non_finite_loss_raises_a_clear_error():
    module = ACIPModule(tiny_pm(), lr=1e-3, lora_lr=1e-3)
    module.l1_weight = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 0.*score map of the last good step"):
        module.training_step({"input_ids": torch.randint(0, 50, (2, 8))}, 0)
