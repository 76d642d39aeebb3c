"""FSDP for ACIP runs (``trainer=fsdp``): one FSDP unit per decoder block, masks outside the shards.

- :class:`DecoderBlockPolicy` wraps every decoder block: the classes the transformers model lists in
  ``_no_split_modules`` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...), found on the model
  itself, so the SVD layers (and their LoRA factors) are sharded with their block.
- The masks are FSDP ``ignored_states``: replicated on every rank and kept fp32 (a flat parameter
  needs one dtype, and the score map needs every mask on every rank after each step, as with DDP);
  :class:`MaskGradSync` averages their gradients over the ranks before each optimiser step.

FSDP shards *parameters* only: the SVD factors ``ortho``/``base`` are buffers of :class:`SVDLinear`,
so they stay whole on every rank (each rank factorises its own copy in ``configure_model``).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = ["DecoderBlockPolicy", "MaskGradSync", "fsdp_strategy", "shard_setup"]


class DecoderBlockPolicy:
    """FSDP auto-wrap policy: wrap each module whose class is a decoder block of the model.

    The block class names come from ``_no_split_modules`` of the transformers model(s) under the
    root FSDP is given (plus ``extra``), read on the first call (the root module).
    """

    def __init__(self, extra: tuple[str, ...] | list[str] = ()) -> None:
        self.extra = set(extra)
        self.names: set[str] | None = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.names is None:
            names = set(self.extra)
            for m in module.modules():
                names |= set(getattr(m, "_no_split_modules", None) or ())
            if not names:
                raise ValueError("trainer=fsdp: the model declares no decoder block class (_no_split_modules); "
                                 "pass trainer.strategy.block_classes=[<DecoderLayer class name>]")
            self.names = names
        return True if recurse else type(module).__name__ in self.names


def fsdp_strategy(block_classes: list[str] | tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Lightning's ``FSDPStrategy`` with :class:`DecoderBlockPolicy` and ``use_orig_params=True``
    (frozen and trainable parameters share a block).

    A subclass: Lightning refuses ``FSDPStrategy`` itself with ``accelerator=cpu`` (its own check,
    not torch's); torch's FSDP runs on CPU with gloo, which is how the tests run it.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    class ACIPFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: nn.Module) -> nn.Module:
            if self.root_device.type != "cpu":
                return super()._setup_model(model)
            from torch.distributed.fsdp import FullyShardedDataParallel

            # Lightning passes device_id=None on CPU, which torch's FSDP refuses ("needs a non-CPU
            # accelerator"); an explicit CPU device is accepted (gloo)
            return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                            mixed_precision=self.mixed_precision_config,
                                            sharding_strategy=self.sharding_strategy,
                                            device_id=torch.device("cpu"), **self.kwargs)

        def lightning_module_state_dict(self) -> dict[str, Any]:
            if self.root_device.type != "cpu":
                return super().lightning_module_state_dict()
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            # offload_to_cpu=True (Lightning's choice) crashes gloo on CPU; the tensors are there already
            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=False, rank0_only=False)):
                return self.model.state_dict()

    kwargs.setdefault("use_orig_params", True)
    return ACIPFSDPStrategy(auto_wrap_policy=DecoderBlockPolicy(tuple(block_classes)), **kwargs)


class MaskGradSync(pl.Callback):
    """All-reduce (mean) the masks' gradients before each optimiser step: FSDP ignores the masks.
    """

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.world_size < 2:
            return
        for m in pl_module.pm.mask_parameters():
            if m.grad is not None:
                torch.distributed.all_reduce(m.grad, op=torch.distributed.ReduceOp.SUM)
                m.grad.div_(trainer.world_size)


def shard_setup(module: Any) -> None:
    """Called by ``ACIPModule.configure_model`` once the model exists: under FSDP, keep the masks out of
    the shards and sync their gradients (a no-op for every other strategy)."""
    trainer = module._trainer
    from lightning.pytorch.strategies import FSDPStrategy

    if trainer is None or not isinstance(trainer.strategy, FSDPStrategy):
        return
    masks = module.pm.mask_parameters()
    trainer.strategy.kwargs["ignored_states"] = masks
    if not any(isinstance(cb, MaskGradSync) for cb in trainer.callbacks):
        trainer.callbacks.append(MaskGradSync())
