"""``parametrize(model)``: swap every target linear layer for an :class:`SVDLinear`.

The returned :class:`ACIPModel` wraps the transformers model like a peft model does: ``forward``,
``generate``, attribute access and ``config`` go to the wrapped model, while the ACIP-specific
views (masks, sizes, reversible pruning, adapters) live on the wrapper. ``acip_config`` (an
:class:`ACIPConfig`) is the saved contract: :meth:`ACIPModel.save_pretrained` writes it with
the masks, adapters, basis and score map, and :meth:`ACIPModel.from_pretrained` rebuilds
exactly that model from its base model, nothing else.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .config import ACIPConfig, BaseSource, ConfigError
from .io import ArtifactError, atomic_write, read_tensors, save_tensors
from .score_map import FORMAT as SCORE_MAP_FORMAT
from .score_map import ScoreMap, ScoreMapError
from .surgery import NoTargetLayersError, find_targets, replace_module
from .svd_linear import SVDLinear

__all__ = ["ACIPModel", "parametrize", "NoTargetLayersError", "BasisMismatchError",
           "CONFIG_FILE", "STATE_FILE", "SCORE_MAP_FILE"]

CONFIG_FILE = "acip_config.json"
STATE_FILE = "acip_state.safetensors"
BASIS_FILE = "acip_basis.safetensors"
SCORE_MAP_FILE = "score_map.safetensors"
STATE_FORMAT = "acip.model/1"
_OVERRIDES = ("target_modules", "exclude_modules", "mask_scaling", "lora", "svd_dtype")


class BasisMismatchError(ValueError):
    """A re-computed SVD basis differs from the one the masks were trained in."""


def _fingerprint(layer: SVDLinear) -> torch.Tensor:
    """Sign-invariant fingerprint of each direction ``j``: ``(u_j . y)(b_j . x) / (|u_j||b_j|)``.

    ``u_j`` = column j of ``ortho``, ``b_j`` = row j of ``base``; ``x``, ``y`` are fixed unit
    vectors (seeded). An SVD may flip the sign of a pair (u_j, b_j): the product does not change.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layer.in_features, generator=g, dtype=torch.float64)
    y = torch.randn(layer.out_features, generator=g, dtype=torch.float64)
    x, y = x / x.norm(), y / y.norm()
    u, b = layer.ortho.detach().double().cpu(), layer.base.detach().double().cpu()
    num = (y @ u) * (b @ x)
    return (num / (u.norm(dim=0) * b.norm(dim=1)).clamp_min(1e-30)).float()


class ACIPModel(nn.Module):
    """A transformers model whose target linears are :class:`SVDLinear` layers.

    ``acip_config`` describes the parametrization (``layers`` resolved); ``basis`` holds the
    whitening factors of an activation-aware basis (else None); ``score_map`` is the run's
    score map once there is one (saved and loaded with the model).
    """

    def __init__(self, model: nn.Module, config: ACIPConfig, basis: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        if config.layers is None:
            raise ConfigError("an ACIPModel needs a config with resolved layers (use acip.parametrize)")
        self.model = model
        self.acip_config = config
        self.basis = basis
        self.score_map: ScoreMap | None = None
        self._basis_written: tuple | None = None  # (file identity, digest) of the last basis file written
        self._pinned_numels: list[tuple[nn.Parameter, int]] = []  # (parameter, its whole numel): pin_numels()

    # ------------------------------------------------------------------ behave like the model
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    # ------------------------------------------------------------------ views
    def svd_layers(self) -> dict[str, SVDLinear]:
        return {n: self.model.get_submodule(n) for n in self.acip_config.layers}

    def masks(self) -> dict[str, nn.Parameter]:
        return {n: l.mask for n, l in self.svd_layers().items()}

    def mask_parameters(self) -> list[nn.Parameter]:
        return list(self.masks().values())

    def lora_parameters(self) -> list[nn.Parameter]:
        out = []
        for l in self.svd_layers().values():
            if l.lora_A is not None:
                out += [l.lora_A, l.lora_B]
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def active_ranks(self) -> dict[str, int]:
        return {n: l.active_rank() for n, l in self.svd_layers().items()}

    def size_ratio(self, full: bool = False) -> float:
        """Parameters at the current active ranks / dense parameters.

        ``full=False``: target layers only, ``sum_l cost_l(r_l) / sum_l (in_l*out_l + bias_l)``.
        ``full=True``: the whole model, ``(rest + sum_l cost_l(r_l)) / (rest + sum_l dense_l)`` with
        ``rest`` = :meth:`other_numel` (every unique parameter outside the SVD layers, counted as is);
        LoRA is excluded (it is folded into the factors on export).
        """
        layers = self.svd_layers()
        now = sum(l.cost(l.active_rank()) for l in layers.values())
        dense = sum(l.dense_cost() for l in layers.values())
        if not full:
            return now / dense
        rest = self.other_numel()
        return (rest + now) / (rest + dense)

    def other_numel(self) -> int:
        """Elements of every unique parameter outside the SVD layers (embeddings, norms, head).

        A parameter recorded by :meth:`pin_numels` counts with its recorded size, any other with
        ``p.numel()``. The SVD layers' own tensors (factors, masks, LoRA) never count here.
        """
        own = {id(p) for l in self.svd_layers().values() for p in l.parameters()}  # masks, LoRA, factors
        pinned = {id(p): n for p, n in self._pinned_numels}
        return sum(pinned.get(id(p), p.numel()) for p in self.model.parameters() if id(p) not in own)

    def pin_numels(self) -> None:
        """Record the size of every parameter of the model now, for :meth:`other_numel` (hence
        ``size_ratio(full=True)``) to count from then on.

        Call it before a sharding wrapper takes the model: FSDP (``use_orig_params=True``) keeps the
        parameter objects but leaves each rank a 1-D piece of each (empty where it lies in another
        rank's piece), so ``p.numel()`` would count this rank's shard and the full size ratio would
        differ between ranks and from an unsharded run. The record holds the parameters themselves
        (a deep copy maps it onto the copy's parameters); a parameter that replaces one later counts
        as is. Calling it again records the sizes anew.
        """
        self._pinned_numels = [(p, p.numel()) for p in self.model.parameters()]

    # ------------------------------------------------------------------ reversible pruning
    @torch.no_grad()
    def prune(self, ratio: float, score_map: "ScoreMap | None" = None) -> dict[str, int]:
        """Keep only each layer's best-scored directions at ``ratio`` (masks untouched).

        Uses ``score_map`` (default: this model's own ``score_map``, else the singular-value
        baseline). Undo with :meth:`unprune`. Returns the ranks.
        """
        sm = score_map if score_map is not None else self.score_map or ScoreMap.from_singular_values(self)
        sm.check_compatible(self)
        ranks = sm.ranks_for(ratio, lift=self.liftable_layers())
        keep = sm.keep_indices(ranks)
        for n, l in self.svd_layers().items():
            k = torch.zeros(l.max_rank, dtype=torch.bool, device=l.mask.device)
            k[keep[n].to(k.device)] = True
            l.keep = k
        return ranks

    def liftable_layers(self) -> set[str]:
        """Layers without a trained adapter (no LoRA, or ``B == 0``): stored dense, they keep full ``W``.

        A layer whose adapter was trained while its low-score directions were pruned is excluded:
        restoring those directions next to an adapter that compensates for them double-counts
        (held-out KJV ppl 803 instead of 83 at ratio 0.9 on the quickstart run).
        """
        return {n for n, l in self.svd_layers().items() if l.lora_B is None or not bool(l.lora_B.detach().any())}

    def has_trained_adapters(self) -> bool:
        """Whether any layer has a LoRA adapter with ``B != 0`` (the complement of :meth:`liftable_layers`)."""
        return any(l.lora_B is not None and bool(l.lora_B.detach().any()) for l in self.svd_layers().values())

    def unprune(self) -> None:
        for l in self.svd_layers().values():
            l.keep = None

    @contextlib.contextmanager
    def at_ratio(self, ratio: float, score_map: "ScoreMap | None" = None) -> Iterator[dict[str, int]]:
        """Inside the block the model computes exactly its export at ``ratio`` (adapters included).

        :meth:`prune` keeps the best-scored directions, but a direction whose mask is ``<= 0`` stays
        off (``g(m) = c * 1[m > 0]``), so above the ratio the masks were trained to, ``prune`` alone
        gives fewer directions than :func:`acip.export` keeps. Here every kept direction also gets
        ``g = c``: its mask is set to ``c`` for the block, so the layer is
        ``c * ortho[:, keep] @ base[keep] + s B A``, the exported factors. On exit the masks
        (bit-exact) and every layer's previous pruning state are restored, so blocks nest. Yields
        the ranks. Run the backward pass inside the block; the masks must not be optimised there.
        """
        layers = list(self.svd_layers().values())
        keep_before = [l.keep for l in layers]
        masks_before: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        try:
            ranks = self.prune(ratio, score_map)
            with torch.no_grad():
                for l in layers:
                    off = l.keep & (l.mask.detach() <= 0)
                    if bool(off.any()):
                        masks_before.append((l, off, l.mask.detach()[off].clone()))
                        l.mask[off] = l.mask_scaling
            yield ranks
        finally:
            with torch.no_grad():
                for l, off, values in masks_before:
                    l.mask[off] = values
            for l, k in zip(layers, keep_before):
                l.keep = k

    @contextlib.contextmanager
    def dense_view(self) -> Iterator["ACIPModel"]:
        """Inside the block the model computes the *uncompressed* base model: every layer is
        ``c * ortho @ base = W`` (all directions, masks and adapters ignored, no gradient).

        This is the teacher of a distillation objective without a second copy of the weights.
        """
        layers = list(self.svd_layers().values())
        before = [l.dense_view for l in layers]
        for l in layers:
            l.dense_view = True
        try:
            yield self
        finally:
            for l, b in zip(layers, before):
                l.dense_view = b

    # ------------------------------------------------------------------ adapters and persistence
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Masks and LoRA factors: everything a run trains."""
        out = {}
        for n, l in self.svd_layers().items():
            out[f"{n}.mask"] = l.mask.detach().cpu().contiguous()
            if l.lora_A is not None:
                out[f"{n}.lora_A"] = l.lora_A.detach().cpu().contiguous()
                out[f"{n}.lora_B"] = l.lora_B.detach().cpu().contiguous()
        return out

    def save_pretrained(self, path: str | os.PathLike, save_factors: bool = False) -> Path:
        """Write this parametrized model's own description into directory ``path``.

        ``acip_state.safetensors`` is the one file that commits a save (written atomically, every
        tensor and the header under sha256): the config, masks, LoRA factors, a sign-invariant
        fingerprint of every layer's SVD and the score map's scores. The activation-aware basis
        (whitening factors, the largest part) goes to ``acip_basis.safetensors`` first, once per
        directory and process; the state records its ``basis_id``. ``acip_config.json`` (readable copy of the
        config) and ``score_map.safetensors`` (the map on its own) are written beside it.
        ``save_factors=True`` also stores ``ortho`` and ``base``, so a load elsewhere does not
        depend on the SVD coming out the same. Other files in ``path`` are left alone (a run
        directory holds logs and checkpoints too).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        from .._version import __version__

        tensors = dict(self.adapter_state())
        basis_id = None if self.basis is None else self._save_basis(path / BASIS_FILE)
        for n, l in self.svd_layers().items():
            tensors[f"{n}.singular_values"] = l.singular_values.detach().float().cpu()
            tensors[f"{n}.fingerprint"] = _fingerprint(l)
            if save_factors:
                tensors[f"{n}.ortho"], tensors[f"{n}.base"] = l.ortho.detach().cpu(), l.base.detach().cpu()
        sm = self.score_map
        if sm is not None:
            sm.check_compatible(self)
            tensors.update({f"score.{n}": s for n, s in sm.scores.items()})
        cfg_json = self.acip_config.to_json()
        meta = {
            "format": STATE_FORMAT, "acip_version": __version__, "save_id": uuid.uuid4().hex,
            "config": cfg_json, "save_factors": json.dumps(bool(save_factors)), "basis_id": json.dumps(basis_id),
            "score_map": json.dumps(None if sm is None else {"method": sm.method, "stop_ratio": sm.stop_ratio,
                                                             "meta": sm.meta}),
        }
        if sm is not None:
            sm.save(path / SCORE_MAP_FILE)
        save_tensors(path / STATE_FILE, tensors, meta)  # the commit point
        readable = {"format": STATE_FORMAT, "save_id": meta["save_id"], "config": self.acip_config.to_dict()}
        atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(readable, indent=2)))
        return path

    @classmethod
    @torch.no_grad()
    def from_pretrained(cls, path: str | os.PathLike, model: nn.Module | None = None, verify: bool = True,
                        dtype: torch.dtype | None = None, basis_tolerance: float = 5e-2) -> "ACIPModel":
        """Rebuild exactly the model :meth:`save_pretrained` wrote, from its own saved description.

        The base model comes from ``model`` (parametrized in place) or from the config's source.
        The basis is the saved factors when present; otherwise the SVD is re-computed (in the saved
        basis, with the saved whitening factors) and checked against the saved fingerprint: a
        layer whose singular values differ by more than 1e-3 (relative) or whose directions'
        fingerprints differ by more than ``basis_tolerance`` on over 1% of them raises
        :class:`BasisMismatchError`.
        """
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"no {STATE_FILE} in {str(path)!r}: not a saved ACIPModel (save one with "
                                    f"ACIPModel.save_pretrained, or pass a run directory)")
        state, meta = read_tensors(state_file, verify=verify, what="acip model state")
        if meta.get("format") != STATE_FORMAT:
            raise ArtifactError(f"{str(state_file)!r} has format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        try:
            config = ACIPConfig.from_dict(json.loads(meta["config"]))
        except (KeyError, json.JSONDecodeError, ConfigError, TypeError) as e:
            raise ArtifactError(f"{str(state_file)!r}: damaged config ({e})") from None
        readable = path / CONFIG_FILE
        if verify and readable.is_file():
            try:
                side = json.loads(readable.read_text())
            except json.JSONDecodeError:
                side = None
            if not isinstance(side, dict) or side.get("config") != config.to_dict():
                raise ArtifactError(f"{str(readable)!r} does not match the config saved in {STATE_FILE} (edited?). "
                                    f"The state file is authoritative: delete {CONFIG_FILE} or restore it.")
        layers = list(config.layers or ())
        if model is None:
            from .base import load_base

            if not config.source.model:
                raise ValueError(f"{str(path)!r} was saved from a model object, so its base model is unknown: "
                                 f"pass it, ACIPModel.from_pretrained(path, model=base_model)")
            model, _ = load_base(config.source.model, dtype=dtype or getattr(torch, config.source.dtype))
        basis = None
        if config.basis == "activation_aware":
            basis = _load_basis(path / BASIS_FILE, json.loads(meta.get("basis_id", "null")), layers, verify)
        factors = None
        if json.loads(meta.get("save_factors", "false")):
            factors = {n: (state[f"{n}.ortho"], state[f"{n}.base"], state[f"{n}.singular_values"]) for n in layers}
        pm = parametrize(model, config, whitening=basis, _factors=factors)
        if factors is None:
            _check_basis(pm, state, state_file, basis_tolerance)
        pm.load_adapter_state(state, str(state_file))
        sm_meta = json.loads(meta.get("score_map", "null"))
        if sm_meta is not None:
            scores = {n: state[f"score.{n}"] for n in layers}
            pm.score_map = ScoreMap._from_layers(pm, scores, sm_meta["method"], stop_ratio=sm_meta["stop_ratio"],
                                                 meta=sm_meta["meta"])
        return pm

    def _save_basis(self, file: Path) -> str:
        """Write the whitening factors to their own file once; later saves into the same directory
        reuse it while it is unchanged (it is the largest part of a run's state). Returns the
        file's ``basis_id`` (in its sha256-covered header), which the state file records."""
        if file.is_file() and self._basis_written is not None:
            st = file.stat()
            if self._basis_written[0] == (str(file.resolve()), st.st_size, st.st_mtime_ns):
                return self._basis_written[1]
        basis_id = uuid.uuid4().hex
        save_tensors(file, {f"{n}.whitening": t for n, t in self.basis.items()},
                     {"format": STATE_FORMAT, "basis_id": basis_id})
        st = file.stat()
        self._basis_written = ((str(file.resolve()), st.st_size, st.st_mtime_ns), basis_id)
        return basis_id

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor], where: str = "state") -> None:
        """Copy masks and LoRA factors from ``state`` (names ``<layer>.mask`` ...); shapes checked."""
        for name, l in self.svd_layers().items():
            for attr in ("mask", "lora_A", "lora_B"):
                key, dst = f"{name}.{attr}", getattr(l, attr)
                if dst is None:
                    if key in state:
                        raise ArtifactError(f"{where} has {key!r} but the config has no LoRA")
                    continue
                if key not in state:
                    raise ArtifactError(f"{where} has no {key!r}: the file is incomplete")
                if tuple(state[key].shape) != tuple(dst.shape):
                    raise ArtifactError(f"{where}: {key} has shape {tuple(state[key].shape)}, the model "
                                        f"{tuple(dst.shape)}")
                dst.copy_(state[key])


def _load_basis(file: Path, want: str | None, layers: list[str], verify: bool) -> dict[str, torch.Tensor]:
    """The whitening factors of an activation-aware basis, checked against the state file's record."""
    tensors, meta = read_tensors(file, verify=verify, what="activation-aware basis (whitening factors)")
    if want is not None and meta.get("basis_id") != want:
        raise ArtifactError(f"{str(file)!r} is not the basis this state was saved with (another save replaced it); "
                            f"restore the run directory from a copy")
    missing = [n for n in layers if f"{n}.whitening" not in tensors]
    if missing:
        raise ArtifactError(f"{str(file)!r} has no whitening factors for layers {missing[:3]}")
    return {n: tensors[f"{n}.whitening"] for n in layers}


def _check_basis(pm: ACIPModel, state: dict, where: Any, tol: float) -> None:
    for n, l in pm.svd_layers().items():
        s_old, s_new = state[f"{n}.singular_values"].double(), l.singular_values.double()
        rel = ((s_old - s_new).abs().max() / s_old.abs().max().clamp_min(1e-30)).item()
        dev = (state[f"{n}.fingerprint"].double() - _fingerprint(l).double()).abs()
        frac = (dev > tol).double().mean().item()
        if rel > 1e-3 or frac > 0.01:
            raise BasisMismatchError(
                f"{where}: layer {n!r}: the re-computed SVD basis differs from the trained one (singular values "
                f"rel. diff {rel:.2e}, {100 * frac:.1f}% of directions moved). The base model or its weights "
                f"changed, or the SVD differs on this machine: load the same base model, or save the run with "
                f"save_factors=True."
            )


def parametrize(
    model: nn.Module,
    config: ACIPConfig | None = None,
    device: torch.device | str | None = None,
    *,
    whitening: dict[str, torch.Tensor] | None = None,
    _factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    **overrides: Any,
) -> ACIPModel:
    """Replace every target linear layer of ``model`` by its exact SVD parametrization.

    ``config`` (an :class:`ACIPConfig`, default ``ACIPConfig()``) says which layers and how;
    keyword ``overrides`` (``target_modules``, ``exclude_modules``, ``mask_scaling``, ``lora``,
    ``svd_dtype``) replace its fields, so ``parametrize(model, lora={"r": 8})`` keeps working.
    ``whitening`` (layer name -> Cholesky factor ``L``, from
    :func:`acip.core.whiten.calibrate_whitening`) gives the activation-aware basis ``W L = U S V^T``.

    The model is changed in place (its layers are swapped) and wrapped; all original parameters
    are frozen, the masks (and LoRA factors) are trainable. Outputs are unchanged up to the SVD's
    round-off (relative error ~1e-7 in fp32). A config with resolved ``layers`` must select exactly
    those layers in ``model`` (else an error names the differences).

    One layer at a time, on ``device`` (default: where each layer is): the layer's weight is moved
    there, factorised in float32 (float64 when ``config.svd_dtype == "float64"``, the default),
    the factors are stored in the model's dtype (bf16 stays bf16; masks and singular values are
    float32) and the dense layer is dropped before the next one, so peak memory is the
    parametrized model plus one layer's SVD workspace. With ``device`` given, the rest of the
    model (embeddings, norms) is moved there at the end, so the result lives wholly on
    ``device``; a model loaded on the host and parametrized with ``device="cuda"`` never holds
    more than one dense layer on the GPU besides the factors. On the host, freed workspace is
    handed back to the OS after every layer (glibc ``malloc_trim``), and the pages of a dense
    weight that was memory-mapped from a safetensors file are released once nothing refers to it.
    """
    from tqdm.auto import tqdm

    if isinstance(model, ACIPModel):
        raise TypeError("this model is already parametrized; pass the original transformers model")
    if not isinstance(model, nn.Module):
        raise TypeError(f"parametrize expects a torch nn.Module (a transformers model), got {type(model).__name__}")
    if config is not None and not isinstance(config, ACIPConfig):
        raise TypeError(f"config must be an acip.ACIPConfig, got {type(config).__name__}; keyword arguments "
                        f"({', '.join(_OVERRIDES)}) may be passed directly")
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise TypeError(f"parametrize() got unknown arguments {unknown}; known: {list(_OVERRIDES)}")
    if "svd_dtype" in overrides:
        overrides["svd_dtype"] = str(overrides["svd_dtype"]).replace("torch.", "")
    cfg = (config or ACIPConfig()).replace(**overrides) if overrides else (config or ACIPConfig())
    if whitening is not None:
        cfg = cfg.replace(basis="activation_aware")
    elif cfg.basis == "activation_aware":
        raise ValueError("this config is in the activation-aware basis but no whitening factors were given; "
                         "calibrate them with acip.core.whiten.calibrate_whitening, or use basis='plain'")
    if cfg.source.kind == "object" and getattr(model, "acip_source", None):
        cfg = cfg.replace(source=BaseSource.from_any(dict(model.acip_source)))
    names = find_targets(model, cfg.target_modules, cfg.exclude_modules)
    if cfg.layers is not None and names != list(cfg.layers):
        extra, gone = sorted(set(names) - set(cfg.layers)), sorted(set(cfg.layers) - set(names))
        raise ScoreMapError(
            f"the model's target layers differ from the ones this parametrization was made for: "
            f"{len(extra)} not in it (first {extra[:3]}), {len(gone)} missing from the model (first {gone[:3]})"
            + ("" if extra or gone else " (same names, other order)")
            + ". Use the model it was made for."
        )
    if whitening is not None and set(names) - set(whitening):
        raise ValueError(f"whitening factors have no entry for layers {sorted(set(names) - set(whitening))[:3]}; "
                         f"calibrate with the same targets")
    for p in model.parameters():
        p.requires_grad_(False)
    dev = None if device is None else torch.device(device)
    release = _HostRelease(model)
    for name in tqdm(names, desc="SVD", disable=len(names) < 50, leave=False):
        old = model.get_submodule(name)
        watch = release.watch(old)
        if dev is not None:  # the dense layer goes to the device first (then dropped there)
            old.to(dev)
        if _factors is not None:
            layer = SVDLinear.from_factors(old, *_factors[name], mask_scaling=cfg.mask_scaling)
        else:
            lw = None if whitening is None else whitening[name]
            layer = SVDLinear.from_linear(old, cfg.mask_scaling, cfg.torch_svd_dtype, whitening=lw, device=dev)
        layer.whitened = whitening is not None
        if cfg.lora is not None:
            layer.add_lora(cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout)
        replace_module(model, name, layer)
        del old, layer  # the dense weight is freed here unless the caller still holds it
        release.after_layer(watch)
    release.close()
    if dev is not None:
        model.to(dev)
    return ACIPModel(model, cfg.replace(layers=tuple(names)), whitening)


class _HostRelease:
    """Hand host memory back to the OS while :func:`parametrize` walks the layers (Linux/glibc only).

    Two things kept the host's resident memory near twice the model before: glibc keeps the freed
    SVD workspaces of one layer to serve the next (``malloc_trim(0)`` returns them), and a model
    loaded from safetensors lives in one private memory map of the file whose pages stay resident
    (and counted) after their tensor is freed, for as long as any other tensor of the file is alive.
    For a dense weight whose storage has died (checked with a storage weak reference) and whose
    whole pages lie inside such a file mapping, overlapping no live tensor of the model,
    ``madvise(MADV_DONTNEED)`` drops those pages (a private file page dropped reads back as the
    file's bytes, never as another allocation's). One live tensor of each mapping is held for the
    duration, so no mapping can be unmapped (and its addresses reused) between the check and the
    call. Elsewhere (other OS, no glibc, GPU weights) every step is a no-op.
    """

    def __init__(self, model: nn.Module) -> None:
        self.libc = None
        self.released = 0  # bytes of dead memory-mapped weights handed back (for tests and benchmarks)
        self.maps: list[tuple[int, int]] = []
        self.keep: list[torch.Tensor] = []
        self.model = model
        try:
            import ctypes
            import ctypes.util

            if os.name == "posix" and os.path.exists("/proc/self/maps"):
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                if hasattr(libc, "madvise") and hasattr(libc, "malloc_trim"):
                    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                    libc.malloc_trim.argtypes = [ctypes.c_size_t]
                    self.libc = libc
        except (OSError, AttributeError):
            self.libc = None
        if self.libc is None:
            return
        self.page = os.sysconf("SC_PAGE_SIZE")
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split()
                    # start-end perms offset dev inode path: a private mapping of a real file
                    if len(parts) >= 6 and parts[1][3] == "p" and parts[4] != "0" and not parts[5].startswith("["):
                        a, b = (int(x, 16) for x in parts[0].split("-"))
                        self.maps.append((a, b))
        except OSError:
            self.maps = []
        for t in self._tensors():  # one live tensor per mapping keeps that mapping alive
            m = self._mapping(t.data_ptr())
            if m is not None and all(self._mapping(k.data_ptr()) != m for k in self.keep):
                self.keep.append(t)

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in list(self.model.parameters()) + list(self.model.buffers())
                if t.device.type == "cpu" and t.numel()]

    def _mapping(self, ptr: int) -> tuple[int, int] | None:
        for a, b in self.maps:
            if a <= ptr < b:
                return a, b
        return None

    def watch(self, module: nn.Module) -> Any:
        """A weak reference to the dense weight's storage, when its pages may be released later."""
        w = getattr(module, "weight", None)
        if self.libc is None or not self.maps or not isinstance(w, torch.Tensor) or w.device.type != "cpu":
            return None
        st = w.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        m = self._mapping(ptr)
        if m is None or ptr + n > m[1] or any(k.untyped_storage().data_ptr() == ptr for k in self.keep):
            return None
        return st._weak_ref(), ptr, n

    def after_layer(self, watch: Any) -> None:
        if self.libc is None:
            return
        if watch is not None:
            ref, ptr, n = watch
            try:
                if torch.UntypedStorage._expired(ref):
                    lo = -(-ptr // self.page) * self.page
                    hi = (ptr + n) // self.page * self.page
                    live = [(st.data_ptr(), st.data_ptr() + st.nbytes())
                            for st in (t.untyped_storage() for t in self._tensors())]
                    if hi > lo and not any(a < hi and b > lo for a, b in live):
                        if self.libc.madvise(lo, hi - lo, 4) == 0:  # MADV_DONTNEED
                            self.released += hi - lo
            finally:
                torch.UntypedStorage._free_weak_ref(ref)
        self.libc.malloc_trim(0)

    def close(self) -> None:
        self.keep.clear()
