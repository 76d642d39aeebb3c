"""The large-model path of a run: parametrize in ``configure_model`` on the training device, bf16 runs,
``num_threads`` defaults."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from acip.train.module import ACIPModule
from acip.train.run import parametrizer
from acip.train.schedule import ACIPSchedule
from helpers_train import child_env, run_compress, tiny_base
from test_train_module import tiny_data

ROOT = Path(__file__).resolve().parents[1]


def _fit(module: ACIPModule, steps: int, **trainer_kw) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         **trainer_kw)
    trainer.fit(module, datamodule=tiny_data(steps))
    return trainer


def test_configure_model_parametrizes_on_the_strategy_device_with_the_same_score_map():
    import acip

    lora = {"r": 2, "lora_alpha": 4}
    eager = ACIPModule(acip.parametrize(tiny_base(), lora=lora), lr=5e-3, lora_lr=5e-3,
                       schedule=ACIPSchedule(l1_init=1e-2))  # LoRA drawn right after the model
    base = tiny_base()
    rng, devices = torch.random.get_rng_state(), []

    def build(device):
        devices.append(torch.device(device))
        return parametrizer(base, acip.ACIPConfig(lora=lora), None, rng)(device)

    lazy = ACIPModule(None, lr=5e-3, lora_lr=5e-3, schedule=ACIPSchedule(l1_init=1e-2), build=build)
    assert lazy.pm is None and lazy.score_map is None  # nothing parametrized before the trainer runs
    _fit(eager, 4)
    torch.manual_seed(123)  # other RNG state in between: the build restores the captured one
    _fit(lazy, 4)
    assert devices == [torch.device("cpu")]  # built once, on the strategy's root device
    assert lazy.score_map.digest() == eager.score_map.digest()
    assert {id(p) for p in lazy.parameters() if p.requires_grad} == {
        id(p) for p in lazy.pm.mask_parameters() + lazy.pm.lora_parameters()}
    with pytest.raises(TypeError, match="build"):
        ACIPModule(None, lr=1e-3, lora_lr=1e-3)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_run_keeps_masks_scores_and_loss_fp32_and_factors_bf16(precision):
    import acip

    pm = acip.parametrize(tiny_base().to(torch.bfloat16), lora={"r": 2, "lora_alpha": 4})
    module = ACIPModule(pm, lr=5e-3, lora_lr=5e-3, schedule=ACIPSchedule(l1_init=1e-2))
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["loss"] = outputs["loss"].dtype
            seen["masks"] = {m.dtype for m in pl_module.pm.mask_parameters()}
            seen["grads"] = {m.grad.dtype for m in pl_module.pm.mask_parameters() if m.grad is not None}

    _fit(module, 3, precision=precision, callbacks=[Probe()])
    assert seen["loss"] == torch.float32 and seen["masks"] == {torch.float32}
    assert seen["grads"] <= {torch.float32}
    layer = next(iter(pm.svd_layers().values()))
    assert layer.ortho.dtype == layer.base.dtype == torch.bfloat16
    assert {s.dtype for s in module.score_map.scores.values()} == {torch.float32}
    assert module.schedule.updates == 3 and all(torch.isfinite(s).all() for s in module.score_map.scores.values())


def test_bf16_tiny_run_reaches_its_stop_ratio_and_its_export_is_bf16_and_reloads(tmp_path):
    import acip
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    run_compress(run_dir, "model.dtype=bfloat16", "trainer.precision=bf16-true", "eval.enabled=false",
                 env=child_env(WANDB_MODE="disabled"))
    sm = acip.ScoreMap.load(run_dir / "score_map.safetensors")
    assert sm.meta["updates"] > 0
    with safe_open(str(run_dir / "acip_state.safetensors"), "pt") as f:
        masks = [f.get_tensor(k) for k in f.keys() if "mask" in k]
    assert masks and {m.dtype for m in masks} == {torch.float32}
    pm = acip.load(run_dir)
    assert pm.size_ratio() <= 0.5 + 1e-6  # experiment=tiny stops at 0.5
    small = acip.export(run_dir, ratio=0.6)
    assert {p.dtype for p in small.parameters()} == {torch.bfloat16}
    small.save_pretrained(tmp_path / "small")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, small(input_ids=ids).logits)
    out = back.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)


def test_every_model_group_accepts_dtype_and_num_threads_defaults_to_torch():
    for f in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        assert "dtype" in OmegaConf.load(f), f"conf/model/{f.name} has no dtype"
    from acip.train.models import model_dtype

    assert model_dtype("bfloat16") is torch.bfloat16 and model_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="model.dtype"):
        model_dtype("int8")
    assert OmegaConf.load(ROOT / "conf" / "compress.yaml").num_threads is None
