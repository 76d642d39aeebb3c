"""trainer=fsdp: the auto-wrap policy (one FSDP unit per decoder block), masks outside the shards, and two
CPU processes (gloo) running the tiny model end to end."""
from __future__ import annotations

import sys

from omegaconf import OmegaConf

from acip.train.scale import DecoderBlockPolicy, fsdp_strategy
from helpers_train import child_env, run_compress, tiny_pm

FSDP_ARGS = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
             "eval.enabled=false", "acip.lora=null", "acip.post_tune_steps=0")


def test_policy_wraps_each_decoder_block_and_nothing_else():
    pm = tiny_pm()
    policy = DecoderBlockPolicy()
    assert policy(pm, recurse=True, nonwrapped_numel=0)  # the root: descend, and learn the block classes
    assert policy.names == {"LlamaDecoderLayer"}
    wrapped = [n for n, m in pm.named_modules() if policy(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == ["model.model.layers.0"] or wrapped == [n for n, _ in pm.named_modules()
                                                               if n.endswith("layers.0")]
    assert not policy(pm.svd_layers()[next(iter(pm.svd_layers()))], recurse=False, nonwrapped_numel=0)
    strategy = fsdp_strategy()
    assert isinstance(strategy.kwargs.get("use_orig_params"), bool) and strategy.kwargs["use_orig_params"]


def test_fsdp_config_builds_the_acip_strategy():
    from hydra import compose, initialize_config_dir

    from acip.train.run import _world

    with initialize_config_dir(config_dir=str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf"),
                               version_base="1.3"):
        cfg = compose("compress", overrides=["experiment=tiny", *FSDP_ARGS])
    assert cfg.trainer.strategy._target_ == "acip.train.scale.fsdp_strategy"
    assert _world(cfg) == 2
    assert OmegaConf.select(cfg, "trainer.precision") == "32-true"
    from acip.train.run import validate

    cfg.eval.enabled = True
    with __import__("pytest").raises(ValueError, match="eval.enabled=false"):
        validate(cfg)
    cfg.eval.enabled = False
    cfg.acip.lora = {"r": 4, "lora_alpha": 8}  # adapters would be saved as rank 0's flat shard: refused up front
    with __import__("pytest").raises(ValueError, match="acip.lora=null"):
        validate(cfg)


def test_fsdp_two_cpu_processes_train_the_tiny_model_to_the_ddp_score_map(tmp_path):
    import acip

    fsdp_dir, ddp_dir = tmp_path / "fsdp", tmp_path / "ddp"
    common = ("experiment=tiny", "data.max_train_texts=1500", "data.max_heldout_texts=200")
    cmd = [sys.executable, "-m", "acip.compress", *common, f"hydra.run.dir={fsdp_dir}", *FSDP_ARGS]
    proc = run_compress(fsdp_dir, cmd=cmd, env=child_env(WANDB_MODE="disabled"), timeout=900)
    # both ranks' score-map digests are gathered at the end (ReplicaMismatchError if they differ)
    assert "ReplicaMismatchError" not in proc.stderr
    cmd = [sys.executable, "-m", "acip.compress", *common, f"hydra.run.dir={ddp_dir}", "trainer=ddp",
           "trainer.devices=2", "acip.lora=null", "acip.post_tune_steps=0", "eval.enabled=false"]
    run_compress(ddp_dir, cmd=cmd, env=child_env(WANDB_MODE="disabled"), timeout=900)
    fsdp_map = acip.ScoreMap.load(fsdp_dir / "score_map.safetensors")
    ddp_map = acip.ScoreMap.load(ddp_dir / "score_map.safetensors")
    assert fsdp_map.meta["updates"] == ddp_map.meta["updates"] > 0
    assert fsdp_map.digest() == ddp_map.digest()  # the same run, bit for bit (measured: e23eb2d1...)
    pm = acip.load(fsdp_dir)
    assert pm.size_ratio() <= 0.5 + 1e-6
