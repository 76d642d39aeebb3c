"""FSDP for ACIP runs (``trainer=fsdp``): one FSDP unit per decoder block, masks outside the shards.

- :class:`DecoderBlockPolicy` wraps every decoder block: the classes the transformers model lists in
  ``_no_split_modules`` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...), found on the model
  itself, so the SVD layers (and their LoRA factors) are sharded with their block.
- The masks are FSDP ``ignored_states``: replicated on every rank and kept fp32 (a flat parameter
  needs one dtype, and the score map needs every mask on every rank after each step, as with DDP);
  :class:`MaskGradSync` averages their gradients over the ranks before each optimiser step.

- :func:`rank_zero_with_full_params` runs work that reads the whole model (saving the run directory,
  the final evaluation) on rank 0 with every parameter gathered: outside forward/backward each rank
  holds only its flat shard (``use_orig_params=True`` leaves the original parameters as 1-D views of it).

FSDP shards *parameters* only: the SVD factors ``ortho``/``base`` are buffers of :class:`SVDLinear`,
so they stay whole on every rank (each rank factorises its own copy in ``configure_model``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, TypeVar

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = ["DecoderBlockPolicy", "MaskGradSync", "fsdp_strategy", "is_fsdp", "rank_zero_with_full_params",
           "shard_setup"]

T = TypeVar("T")


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

        def _full_state_dicts(self) -> Any:
            """Lightning's full state dict context with ``offload_to_cpu=False``: on CPU the tensors are there
            already, and offloading them goes wrong (both cases below)."""
            from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                        FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
                                        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True))

        def lightning_module_state_dict(self) -> dict[str, Any]:
            if self.root_device.type != "cpu":
                return super().lightning_module_state_dict()
            with self._full_state_dicts():  # offload_to_cpu=True (Lightning's choice) crashes gloo on CPU
                return self.model.state_dict()

        def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
            """The optimizer's full state (rank 0; keyed by parameter id, as Lightning stores it).

            Lightning gathers it with ``offload_to_cpu=True``. torch all-gathers every state of one flat
            parameter (Adam's ``exp_avg``, then ``exp_avg_sq``) into one reused buffer and keeps views of it,
            copied out only by the offload's ``.cpu()``, a no-op on CPU: every state of the LoRA factors then
            held the last one gathered (measured: ``exp_avg`` was ``exp_avg_sq``, one storage), and a
            ``resume=`` continued with a wrong Adam momentum. With ``offload_to_cpu=False`` torch clones each.
            """
            if self.root_device.type != "cpu" or self._state_dict_type != "full":
                return super().optimizer_state(optimizer)
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import OptimStateKeyType

            optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps it
            with self._full_state_dicts():
                state = FSDP.optim_state_dict(self.model, optimizer)
                if self.global_rank == 0:
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

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


def is_fsdp(trainer: Any) -> bool:
    """True when ``trainer`` runs Lightning's FSDP strategy (``trainer=fsdp``); False for every other
    strategy and for objects without one (a test's fake trainer)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return False
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


@contextlib.contextmanager
def _without_fsdp_wrappers(module: nn.Module) -> Iterator[None]:
    """Inside the block, every FSDP unit under ``module`` is replaced by the module it wraps (restored on exit).

    With the full parameters summoned, the wrapped modules hold whole tensors, but an FSDP unit's own
    ``forward`` / ``state_dict`` would try to unshard (or gather) again, which torch refuses inside
    ``summon_full_params`` and which would be collective calls made by rank 0 alone. Without the
    wrappers the model is a plain module: ``state_dict()`` has the model's own names and a forward pass
    is an ordinary one.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        found = True
        while found:  # outermost first: a unit's inner units appear once it is swapped out
            found = False
            for parent in module.modules():
                for name, child in list(parent._modules.items()):
                    if isinstance(child, FSDP):
                        parent._modules[name] = child.module
                        swapped.append((parent, name, child))
                        found = True
        yield
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def rank_zero_with_full_params(trainer: Any, pl_module: Any, work: Callable[[], T],
                               barrier: str | None = None) -> T | None:
    """``work()`` on global rank 0 with the model's full parameters; its result there, None on the other ranks.

    Under FSDP this is collective, every rank must call it: all ranks enter
    ``FullyShardedDataParallel.summon_full_params(<the wrapped root>, writeback=False, rank0_only=True)``
    (the all-gather; the other ranks free their copy at once), rank 0 runs ``work()`` with the FSDP
    wrappers inside ``pl_module.pm`` taken out (:func:`_without_fsdp_wrappers`: the model is a plain
    module with whole tensors; its trainable parameters are copies, :func:`_trainable_as_copies`), and
    every rank then meets at a barrier. ``work`` must not change
    parameters (``writeback=False`` drops any change) nor make collective calls.

    For every other strategy nothing is gathered: rank 0 runs ``work()`` and the others return None at
    once, meeting rank 0 afterwards at ``barrier`` (a name) when one is given and there is more than one
    process.
    """
    if not callable(work):
        raise TypeError(f"work must be a callable taking no arguments, got {type(work).__name__}")
    if barrier is not None and not isinstance(barrier, str):
        raise TypeError(f"barrier must be a barrier name (str) or None, got {type(barrier).__name__}")
    rank_zero = bool(getattr(trainer, "is_global_zero", True))
    if not is_fsdp(trainer):
        out = work() if rank_zero else None
        if barrier is not None and int(getattr(trainer, "world_size", 1)) > 1:
            trainer.strategy.barrier(barrier)
        return out
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = trainer.strategy.model
    if not isinstance(root, FSDP):
        raise RuntimeError(f"trainer=fsdp: the strategy's model is a {type(root).__name__}, not the FSDP-wrapped "
                           f"module (called before the strategy set the model up?)")
    pm = getattr(pl_module, "pm", None)
    if not isinstance(pm, nn.Module):
        raise TypeError(f"pl_module must hold the parametrized model as .pm, got {type(pm).__name__}")
    out = None
    with FSDP.summon_full_params(root, writeback=False, rank0_only=True):
        if rank_zero:
            with _without_fsdp_wrappers(pm), _trainable_as_copies(pm):
                out = work()
    trainer.strategy.barrier(barrier or "acip_full_params")
    return out


@contextlib.contextmanager
def _trainable_as_copies(module: nn.Module) -> Iterator[None]:
    """Inside the block, each trainable parameter of ``module`` holds a copy of its gathered values (restored on exit).

    Summoned parameters are views into FSDP's unsharded flat parameter, which FSDP frees on exit by
    resizing its storage to 0. Saving exposes a tensor's bytes to numpy (safetensors, the sha256
    digests of :mod:`acip.core.io`), and ``Tensor.numpy()`` makes the storage it shares non-resizable:
    FSDP's exit then fails with "Trying to resize storage that is not resizable". The trainable
    parameters (the LoRA factors; the masks are outside the shards) are what the run directory saves,
    and they are small, so only they are copied; the frozen weights stay views (an export clones what
    it keeps).
    """
    held = [(p, p.data) for p in module.parameters() if p.requires_grad]
    try:
        for p, data in held:
            p.data = data.clone()
        yield
    finally:
        for p, data in held:
            p.data = data
