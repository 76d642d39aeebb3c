"""FSDP for ACIP runs (``trainer=fsdp``): one FSDP unit per decoder block holding the frozen SVD factors,
the trainable tensors outside the shards.

- :class:`DecoderBlockPolicy` wraps every decoder block: the classes the transformers model lists in
  ``_no_split_modules`` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...), found on the model
  itself, so each block's SVD layers are sharded with their block.
- FSDP shards *parameters*, and :class:`acip.core.svd_linear.SVDLinear` keeps its factors ``ortho``
  (out x k), ``base`` (k x in) and ``bias`` as buffers. :func:`shard_setup` (called from
  ``ACIPModule.configure_model``, before the strategy wraps the model) turns them into frozen
  ``nn.Parameter(requires_grad=False)`` under the same names, under FSDP only: each rank then holds
  about ``1/world_size`` of every block's factors (``sum_l k_l (in_l + out_l)`` elements in all, each
  block's flat parameter split into ``world_size`` equal pieces, the last one padded), gathered for
  that block's forward and backward only. State-dict names are unchanged, so checkpoints, ``resume=``
  and the run directory are those of a DDP run. Every other strategy keeps the buffers.
- The trainable tensors, masks and LoRA factors (``ACIPModule.trainable()``: what the optimizer gets),
  are FSDP ``ignored_states``: replicated on every rank, as with DDP. The masks must be (fp32, while a
  flat parameter has one dtype; the score map needs every mask on every rank after each step). The
  LoRA factors are kept out so that every flat parameter is frozen: torch's FSDP gives a flat
  parameter holding any trainable tensor a gradient as large as the whole flat parameter, frozen
  factors included (its docs: mixing frozen and non-frozen parameters in one unit costs "higher than
  expected gradient memory"), while a frozen flat parameter gets none. LoRA's ``r (in + out)`` per
  layer is small next to the factors' ``k (in + out)``. :class:`ReplicatedGradSync` averages the
  trainable tensors' gradients over the ranks before each optimiser step (what DDP's all-reduce does).
- :class:`ShardReport` prints, once, what each rank holds of the factors (``[acip] fsdp shards``).
- ``trainer.gradient_clip_val`` (clip by norm) works as under DDP (:class:`ClipAfterSync`): Lightning's
  own ``FSDPPrecision`` refuses it, for want of the root module to call FSDP's ``clip_grad_norm_`` on.
- :func:`shard_setup` records the parameters' whole sizes before wrapping
  (:meth:`acip.ACIPModel.pin_numels`), so ``size_ratio(full=True)`` counts whole tensors, not shards.

- :func:`rank_zero_with_full_params` runs work that reads the whole model (saving the run directory,
  the final evaluation) on rank 0 with every parameter gathered: outside forward/backward each rank
  holds only its flat shard (``use_orig_params=True`` leaves the original parameters as 1-D views of
  it, empty where a tensor lies in another rank's piece), so rank 0 must be able to hold the whole
  model for that work.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, Precision
from torch import nn

__all__ = ["ClipAfterSync", "DecoderBlockPolicy", "ReplicatedGradSync", "ShardReport", "factor_numels",
           "factors_as_parameters", "fsdp_strategy", "is_fsdp", "rank_zero_with_full_params", "shard_setup"]

FACTORS = ("ortho", "base", "bias")  # the frozen tensors of an SVDLinear that FSDP shards

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


class ClipAfterSync(FSDPPrecision):
    """Lightning's ``FSDPPrecision`` that clips by norm (``trainer.gradient_clip_val``, algorithm "norm")
    as DDP does: ``g <- g * min(1, c / (||g|| + 1e-6))``, ``||g||`` the 2-norm over every gradient of the
    optimizer's parameters, each tensor counted once over all ranks.

    Lightning calls it after every ``on_before_optimizer_step`` hook, so after :class:`ReplicatedGradSync`
    averaged the replicated tensors' gradients (the all-reduce DDP does in backward). ``strategy.replicated``
    (ids, set by :func:`shard_setup`) names the tensors outside the shards, whole and equal on every rank:
    when it holds every parameter of the optimizer (the default, ``shard_factors=true``), the clip is
    Lightning's DDP one, ``torch.nn.utils.clip_grad_norm_`` over the optimizer's parameters, and its
    result the DDP run's bit for bit. Otherwise some gradients are FSDP shards (``shard_factors=false``:
    LoRA in the flat parameters), and the clip is torch's ``FullyShardedDataParallel.clip_grad_norm_`` on
    the root unit: ``||g||^2`` = the shards' squares summed over the ranks + the replicated tensors'
    (counted once) -- over every parameter of the model with a gradient, which here are the optimizer's.
    Clipping by value is elementwise and stays Lightning's.
    """

    def __init__(self, precision: Any, scaler: Any = None, strategy: Any = None) -> None:
        super().__init__(precision, scaler)
        self.strategy = strategy

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        replicated = getattr(self.strategy, "replicated", frozenset())
        if all(id(p) in replicated for p in self.main_params(optimizer)):
            Precision.clip_grad_by_norm(self, optimizer, clip_val)  # DDP's: every gradient is whole here
            return
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = getattr(self.strategy, "model", None)
        if not isinstance(root, FSDP):
            raise RuntimeError(f"trainer=fsdp: clipping sharded gradients needs the FSDP-wrapped root module, "
                               f"the strategy holds a {type(root).__name__}")
        root.clip_grad_norm_(clip_val)


def fsdp_strategy(block_classes: list[str] | tuple[str, ...] = (), shard_factors: bool = True, **kwargs: Any) -> Any:
    """Lightning's ``FSDPStrategy`` with :class:`DecoderBlockPolicy` and ``use_orig_params=True`` (the
    model keeps its own parameters, as views of the shards; with ``shard_factors=False`` frozen and
    trainable parameters share a block, which needs it).

    ``shard_factors`` (``trainer.strategy.shard_factors``): True shards the SVD factors with their block
    (:func:`shard_setup`); False leaves them buffers, whole on every rank, and only the LoRA factors
    in the shards (the behaviour before factors were sharded; for measurements and as a way back).
    A subclass: Lightning refuses ``FSDPStrategy`` itself with ``accelerator=cpu`` (its own check,
    not torch's); torch's FSDP runs on CPU with gloo, which is how the tests run it.
    """
    if not isinstance(shard_factors, bool):
        raise TypeError(f"trainer.strategy.shard_factors must be true or false, got {shard_factors!r}")
    from lightning.pytorch.strategies import FSDPStrategy

    class ACIPFSDPStrategy(FSDPStrategy):
        replicated: frozenset[int] = frozenset()  # ids of the tensors outside the shards (shard_setup)

        @property
        def precision_plugin(self) -> FSDPPrecision:
            plugin = self._precision_plugin
            return plugin if plugin is not None else ClipAfterSync("32-true", strategy=self)

        @precision_plugin.setter
        def precision_plugin(self, plugin: Precision | None) -> None:
            """Lightning's connector sets an ``FSDPPrecision``: the same precision and scaler, clipping by norm."""
            if type(plugin) is FSDPPrecision:
                plugin = ClipAfterSync(plugin.precision, plugin.scaler, strategy=self)
            FSDPStrategy.precision_plugin.fset(self, plugin)
            if isinstance(plugin, ClipAfterSync):
                plugin.strategy = self

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
    strategy = ACIPFSDPStrategy(auto_wrap_policy=DecoderBlockPolicy(tuple(block_classes)), **kwargs)
    strategy.shard_factors = shard_factors  # read by shard_setup; not an FSDP argument
    return strategy


class ReplicatedGradSync(pl.Callback):
    """Average the gradients of the tensors FSDP ignores over the ranks before each optimiser step:
    ``g <- (1/W) sum_ranks g``, one all-reduce per dtype, as DDP does for every trainable tensor.

    ``pl_module.trainable()`` (masks and LoRA factors) are replicated outside the shards
    (:func:`shard_setup`); ``replicated`` names them by ``id`` (None: all of them).
    """

    def __init__(self, replicated: set[int] | None = None) -> None:
        self.replicated = replicated

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.world_size < 2:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p in pl_module.trainable():
            if p.grad is not None and (self.replicated is None or id(p) in self.replicated):
                groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in groups.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat.div_(trainer.world_size)
            for g, v in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(v.view_as(g))


def factors_as_parameters(pm: nn.Module) -> int:
    """Re-register each SVD layer's frozen ``ortho``, ``base`` and ``bias`` buffers of ``pm`` (an
    :class:`acip.ACIPModel`) as ``nn.Parameter(requires_grad=False)`` under the same names, sharing the
    same storage, so that FSDP shards them; returns how many tensors moved (0 when they are parameters
    already: idempotent).

    Values, dtypes, devices and state-dict names stay as they are; the SVD layer's forward does not
    care which kind its factors are. Parameters count nowhere they did not before: the optimizer gets
    ``ACIPModule.trainable()`` (masks, LoRA), ``ACIPModel.size_ratio(full=True)`` leaves out every tensor
    of an SVD layer, and ``requires_grad=False`` keeps them out of ``trainable_parameters()``.
    """
    layers = getattr(pm, "svd_layers", None)
    if not callable(layers):
        raise TypeError(f"factors_as_parameters needs an acip.ACIPModel (with svd_layers()), got {type(pm).__name__}")
    moved = 0
    for layer in layers().values():
        for name in FACTORS:
            t = layer._buffers.get(name)
            if t is None:
                continue
            if t.requires_grad:
                raise ValueError(f"the SVD factor {name!r} requires grad: the factors are frozen in ACIP")
            del layer._buffers[name]
            layer.register_parameter(name, nn.Parameter(t, requires_grad=False))
            moved += 1
    return moved


def factor_numels(pm: nn.Module) -> dict[str, int]:
    """What this process holds of the SVD factors now: ``held`` = elements of ``ortho``, ``base`` and
    ``bias`` present here (under FSDP outside forward/backward: this rank's piece of each flat
    parameter, 0 for a tensor in another rank's piece), ``held_bytes`` the same in bytes, and
    ``total`` = ``sum_l k_l (in_l + out_l) (+ out_l with a bias)`` from the layers' shapes."""
    layers = getattr(pm, "svd_layers", None)
    if not callable(layers):
        raise TypeError(f"factor_numels needs an acip.ACIPModel (with svd_layers()), got {type(pm).__name__}")
    held = held_bytes = total = 0
    for l in layers().values():
        total += l.max_rank * (l.in_features + l.out_features) + (l.out_features if l.bias is not None else 0)
        for t in (getattr(l, n) for n in FACTORS):
            if t is not None:
                held += t.numel()
                held_bytes += t.numel() * t.element_size()
    return {"held": held, "held_bytes": held_bytes, "total": total}


class ShardReport(pl.Callback):
    """Once, at the first optimiser step (parameters resharded, gradients present): every rank's
    :func:`factor_numels`, the frozen parameters that hold a gradient (0 expected), the gradient
    elements of the model's parameters (``grad_numel``) and of FSDP's flat parameters
    (``flat_grad_numel``, the sharded gradient FSDP allocates), gathered to rank 0, printed as one line ``[acip] fsdp shards {json}`` and logged as
    ``fsdp/...`` metrics. Collective: every rank runs it at the same step."""

    def __init__(self) -> None:
        self.report: dict[str, Any] | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if self.report is not None:
            return
        import json

        mine = factor_numels(pl_module.pm)
        params = list(pl_module.parameters())
        mine["frozen_with_grad"] = sum(1 for p in params if not p.requires_grad and p.grad is not None)
        mine["grad_numel"] = sum(p.grad.numel() for p in params if p.grad is not None)
        root = trainer.strategy.model if isinstance(trainer.strategy.model, nn.Module) else pl_module
        flats = [f for f in (getattr(m, "_flat_param", None) for m in root.modules()) if f is not None]
        mine["flat_params_with_grad"] = sum(1 for f in flats if f.requires_grad)  # torch's FSDP units' flat params
        mine["flat_grad_numel"] = sum(f.grad.numel() for f in flats if f.grad is not None)  # what FSDP allocated
        ranks: list[Any] = [mine]
        if trainer.world_size > 1:
            ranks = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, mine)
        self.report = {"world_size": trainer.world_size,
                       "shard_factors": bool(getattr(trainer.strategy, "shard_factors", True)),
                       "total": mine["total"], "ranks": ranks}
        if trainer.is_global_zero:
            print(f"[acip] fsdp shards {json.dumps(self.report)}", flush=True)
            for r, d in enumerate(ranks):
                print(f"[acip] fsdp rank {r}: holds {d['held']:,} of {d['total']:,} SVD-factor elements "
                      f"({100 * d['held'] / max(d['total'], 1):.1f}%, {d['held_bytes'] / 2**20:.2f} MiB)", flush=True)
            metrics = {f"fsdp/factor_numel_rank{r}": float(d["held"]) for r, d in enumerate(ranks)}
            metrics["fsdp/factor_numel_total"] = float(mine["total"])
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)


def shard_setup(module: Any) -> None:
    """Called by ``ACIPModule.configure_model`` once the model exists, before the strategy wraps it;
    a no-op for every strategy but FSDP. Under FSDP: the SVD factors become frozen parameters
    (:func:`factors_as_parameters`; unless ``trainer.strategy.shard_factors=false``), the trainable
    tensors (masks, LoRA) become ``ignored_states`` (replicated, their gradients averaged by
    :class:`ReplicatedGradSync`; with ``shard_factors=false`` only the masks, the LoRA factors stay in
    the shards), and :class:`ShardReport` reports once what each rank holds. The model's parameter sizes
    are recorded first (:meth:`acip.ACIPModel.pin_numels`)."""
    trainer = getattr(module, "_trainer", None)
    from lightning.pytorch.strategies import FSDPStrategy

    if trainer is None or not isinstance(trainer.strategy, FSDPStrategy):
        return
    pm = getattr(module, "pm", None)
    if pm is None or not callable(getattr(module, "trainable", None)):
        raise TypeError(f"shard_setup needs the ACIPModule with its parametrized model (.pm), got {type(module).__name__}"
                        f" with pm={type(pm).__name__}")
    pm.pin_numels()  # size_ratio(full=True) counts whole tensors, not this rank's shard of them
    if getattr(trainer.strategy, "shard_factors", True):
        factors_as_parameters(pm)
        replicated = list(module.trainable())
    else:
        replicated = list(pm.mask_parameters())
    trainer.strategy.kwargs["ignored_states"] = replicated
    trainer.strategy.replicated = frozenset(id(p) for p in replicated)  # ClipAfterSync: whole on every rank
    for cb in [cb for cb in trainer.callbacks if isinstance(cb, (ReplicatedGradSync, ShardReport))]:
        trainer.callbacks.remove(cb)
    trainer.callbacks.extend([ReplicatedGradSync({id(p) for p in replicated}), ShardReport()])


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
    parameters are what the run directory saves, and they are small, so only they are copied (with
    :func:`shard_setup`'s default they are outside the shards already; with ``shard_factors=false`` the
    LoRA factors are views). The frozen weights, the SVD factors included, stay views: the save reads
    the factors only through the fingerprint (computed on a float64 copy) and an export clones what it
    keeps.
    """
    held = [(p, p.data) for p in module.parameters() if p.requires_grad]
    try:
        for p, data in held:
            p.data = data.clone()
        yield
    finally:
        for p, data in held:
            p.data = data
