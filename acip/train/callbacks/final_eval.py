"""Final evaluation: perplexity on every held-out domain at the test ratios, ACIP vs the no-training baselines.

For each test ratio rho: ``acip.export(pm, ratio=rho, score_map=module.score_map)`` from the
trained model in memory (export never changes ``pm``). For a run with trained adapters both
``adapters=True`` (column ``acip_adapters``) and ``adapters=False`` (``acip_no_adapters``) are
measured on the **validation split** (``val_texts``: set aside from the run's *training* texts
and never trained on, :func:`acip.train.data.validation_split`); the adapters are kept where they give the lower validation perplexity, the decision is
recorded in the score map's ``meta["adapters_auto"]`` (re-saved with the run directory, so
``acip.export(run_dir, rho)``'s default ``adapters="auto"`` follows it; see
:mod:`acip.export.auto`) and column ``acip`` is that default export. Baselines: the same for
``ScoreMap.from_singular_values`` on the *untrained* weights (``adapters=False``: the factors are
exactly ``U_r, S_r V_r^T``); optionally the activation-aware baseline (SVD-LLM style) calibrated
on ``calib_windows`` training windows (see :mod:`acip.core.whiten`).

Every export is evaluated on every domain (``domains``: names or mappings, see
:mod:`acip.eval.domains`; ``"heldout"`` is the data group's held-out split, only measured, never
used to choose anything) and on the validation split, on the first ``max_windows`` windows of
each; the uncompressed model is measured once per domain (the ``dense`` row). The ratio reported is
the measured one of the exported model. Writes ``results.json`` and ``plots/*.png`` (rank 0), logs
images, a table, ``final/<domain>/ppl_<method>_r<100*rho>`` scalars (the first domain also as
``final/ppl_<method>_r<100*rho>``) and ``final/val_ppl_mean``: the geometric mean over the test
ratios below 1 of column ``acip`` on the validation split (the sweep's metric).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch

from .. import plots

__all__ = ["FinalEvaluation", "evaluate_score_maps", "metric_key", "VAL", "part_key", "part_name", "is_validation",
           "adapter_pairs"]

VAL = "val"  # the validation split's key among the windows (never a reported domain)


def part_key(part: str) -> str:
    """``val/<part>``: the key of one component's share of the validation split (``data=mix``)."""
    return f"{VAL}/{part}"


def part_name(key: str) -> str:
    """``<part>`` of a ``val/<part>`` key (:func:`part_key`'s inverse)."""
    return key[len(VAL) + 1:]


def adapter_pairs(cols: Mapping[str, Mapping[float, float]], ratios: Sequence[float]) -> dict[float, dict[str, float]]:
    """``{ratio: {"adapters": p1, "no_adapters": p0}}`` from one domain's ``{method: {ratio: ppl}}``
    columns ``acip_adapters`` / ``acip_no_adapters`` (what :func:`acip.export.auto.record_decision` reads)."""
    return {r: {"adapters": cols["acip_adapters"][r], "no_adapters": cols["acip_no_adapters"][r]} for r in ratios}


def is_validation(key: str) -> bool:
    """True for the validation split (``val``) and its parts (``val/<part>``): chosen on, never reported."""
    return key == VAL or key.startswith(VAL + "/")


def metric_key(method: str, ratio: float, domain: str | None = None) -> str:
    """``final/ppl_acip_r50`` for ratio 0.5, ``final/pydoc/ppl_acip_r50`` with a domain (no dots in the
    ratio: W&B sweeps read it as a flat key)."""
    return f"final/{domain + '/' if domain else ''}ppl_{method}_r{int(round(100 * ratio))}"


def evaluate_score_maps(score_maps: dict[str, Any], windows: torch.Tensor | Mapping[str, torch.Tensor],
                        ratios: Sequence[float], pm: Any, log: Any = print) -> dict[str, Any]:
    """``{method: {ratio: ppl}}``, measured ratios and kept ranks, exporting ``pm`` with each map at each ratio.

    A value of ``score_maps`` is a ScoreMap, or ``(ScoreMap, export_kwargs)``, e.g.
    ``(sm, {"adapters": False})`` for the trained map exported without its adapters, or for an
    untrained baseline on a model whose adapters were trained. ``windows`` is one id tensor, or
    ``{domain: ids}``: then every export is evaluated on each and ``ppl`` is
    ``{domain: {method: {ratio: ppl}}}`` (one export per method and ratio).
    """
    import acip
    from acip.eval.perplexity import perplexity

    single = isinstance(windows, torch.Tensor)
    wins = {"_": windows} if single else dict(windows)
    ppl: dict[str, dict[str, dict[float, float]]] = {d: {} for d in wins}
    measured: dict[str, dict[float, float]] = {}
    ranks: dict[str, dict[float, dict[str, int]]] = {}
    used: dict[str, dict[float, Any]] = {}
    for method, entry in score_maps.items():
        sm, kwargs = entry if isinstance(entry, tuple) else (entry, {})
        measured[method], ranks[method], used[method] = {}, {}, {}
        for d in wins:
            ppl[d][method] = {}
        for rho in ratios:
            t0 = time.perf_counter()
            small = acip.export(pm, ratio=rho, score_map=sm, **kwargs)
            for d, w in wins.items():
                ppl[d][method][rho] = perplexity(small, None, w, progress=False)
            measured[method][rho] = float(small.config.acip_export["measured_ratio"])
            ranks[method][rho] = {n: e["rank"] for n, e in small.config.acip_layout.items()}  # as exported
            used[method][rho] = small.config.acip_export.get("adapters")
            del small
            figures = ", ".join(f"{d} {ppl[d][method][rho]:.2f}" for d in wins) if not single else \
                f"{ppl['_'][method][rho]:.2f}"
            log(f"[acip] eval {method:16s} ratio {rho:.2f} (measured {measured[method][rho]:.3f}) "
                f"ppl {figures} [{time.perf_counter() - t0:.0f}s]")
    return {"ppl": ppl["_"] if single else ppl, "measured_ratio": measured, "ranks": ranks, "adapters": used}


def _check_names(domains: Sequence[str]) -> None:
    if any(is_validation(d) for d in domains):
        raise ValueError(f"eval.domains: {VAL!r} (and {VAL + '/...'!r}) name the validation split and its parts; "
                         f"name the domain otherwise")


def _gmean(values: Sequence[float]) -> float:
    vals = list(values)
    if not vals:
        return float("nan")
    if any(not math.isfinite(v) for v in vals):
        return float("inf")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def _keys(d: Mapping[float, Any]) -> dict[str, Any]:
    return {f"{r:g}": v for r, v in d.items()}


class FinalEvaluation(pl.Callback):
    """Runs on rank 0 at the end of training (other ranks wait at a barrier)."""

    def __init__(self, run_dir: str | Path, tokenizer: Any, heldout_texts: Sequence[str],
                 ratios: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4), seq_len: int = 256,
                 max_windows: int | None = 40, baseline: bool = True,
                 extra: dict | None = None, calib_texts: Sequence[str] | None = None,
                 calib_windows: int = 0, no_adapters: bool = True, domains: Sequence[Any] = ("heldout",),
                 val_texts: Sequence[str] = (), val_windows: int | None = None) -> None:
        from acip.core.size import check_ratio

        self.run_dir, self.tokenizer = Path(run_dir), tokenizer
        self.ratios = sorted((check_ratio(r, "eval.ratios") for r in ratios), reverse=True)
        self.seq_len, self.max_windows, self.baseline = int(seq_len), max_windows, bool(baseline)
        self.extra = dict(extra or {})
        if calib_windows < 0 or (calib_windows and not calib_texts):
            raise ValueError(f"calib_windows={calib_windows} needs calibration texts (the training text); "
                             f"pass calib_texts or set eval.activation_aware_windows=0")
        self.calib_texts, self.calib_windows = list(calib_texts or []), int(calib_windows)
        self.no_adapters = bool(no_adapters)
        from ..data import LabeledTexts

        # a mixture's split keeps its labels: each component is also measured on its own (part_windows)
        self.val_texts = val_texts if isinstance(val_texts, LabeledTexts) else list(val_texts)
        self.heldout_texts = list(heldout_texts)
        if not self.val_texts:
            raise ValueError("the final evaluation needs the validation split (val_texts: texts set aside from the "
                             "training data, acip.train.data.validation_split); got none")
        if not self.heldout_texts:
            raise ValueError("the data group's held-out split is empty; the final evaluation measures on it")
        self.val_windows = max_windows if val_windows is None else int(val_windows)
        from acip.eval.domains import check_domains

        self.domain_specs = list(domains)
        _check_names(check_domains(self.domain_specs))  # fail before training, not after it
        self.results: dict[str, Any] | None = None
        self.t_start = time.time()

    @classmethod
    def from_config(cls, cfg: Any, run_dir: str | Path, parts: Mapping[str, Any]) -> "FinalEvaluation":
        """The callback as ``conf/compress.yaml``'s ``eval:`` section describes it."""
        from omegaconf import OmegaConf

        e = cfg.eval
        domains = e.get("domains", None)
        domains = ["heldout"] if domains is None else OmegaConf.to_container(domains, resolve=True)
        return cls(run_dir, parts["tokenizer"], parts["heldout_texts"], list(e.ratios), e.seq_len, e.max_windows,
                   e.baseline, calib_texts=parts["train_texts"],
                   calib_windows=int(e.get("activation_aware_windows", 0) or 0),
                   no_adapters=bool(e.get("no_adapters", True)), domains=domains,
                   val_texts=parts["val_texts"], val_windows=e.get("val_windows", None))

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.t_start = time.time()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """:meth:`run` on rank 0, the other ranks waiting at a barrier; under FSDP with the full parameters
        gathered first (every rank takes part: :func:`acip.train.scale.rank_zero_with_full_params`)."""
        from ..scale import rank_zero_with_full_params

        out = rank_zero_with_full_params(trainer, pl_module, lambda: self.run(trainer, pl_module),
                                         barrier="acip_final_eval")
        if trainer.is_global_zero:
            self.results = out

    def windows(self) -> dict[str, torch.Tensor]:
        """``{"val": ..., "val/<part>": ..., domain: ...}``: the first ``max_windows`` windows of each
        text (the validation split's: ``val_windows``, pooled and, for a mixture, per component)."""
        from acip.eval.domains import resolve_domains
        from acip.eval.perplexity import token_windows

        from ..data import part_windows

        texts = resolve_domains(self.domain_specs, self.heldout_texts)
        _check_names(texts)
        own = {spec["name"]: int(spec["windows"]) for spec in self.domain_specs
               if isinstance(spec, Mapping) and spec.get("windows") is not None}  # {name: x, windows: 8}
        out = {VAL: token_windows(self.tokenizer, self.val_texts, self.seq_len, self.val_windows)}
        for part, w in part_windows(self.tokenizer, self.val_texts, self.seq_len, self.val_windows).items():
            out[part_key(part)] = w
        for name, t in texts.items():
            out[name] = token_windows(self.tokenizer, t, self.seq_len, own.get(name, self.max_windows))
        return out

    @torch.no_grad()
    def run(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, Any]:
        from acip import ScoreMap
        from acip.core.io import atomic_write
        from acip.eval.perplexity import perplexity
        from acip.eval.sweep import format_table, plot_domain_curves
        from acip.export.auto import record_decision

        train_time = time.time() - self.t_start
        pm = pl_module.pm
        pm.eval()
        t0 = time.time()
        wins = self.windows()
        with pm.dense_view():  # the uncompressed model: every W, no adapters
            reference = {d: perplexity(pm, None, w, progress=False) for d, w in wins.items()}
        sm = pl_module.score_map
        trained = pm.has_trained_adapters()
        choose = trained and self.no_adapters
        maps: dict[str, Any] = {}
        if choose:  # both, then column "acip" is the auto choice (no further export)
            maps["acip_adapters"] = (sm, {"adapters": True})
            maps["acip_no_adapters"] = (sm, {"adapters": False})
        else:
            maps["acip"] = (sm, {"adapters": True})
        ev = evaluate_score_maps(maps, wins, self.ratios, pm)
        reported = {d: w for d, w in wins.items() if not is_validation(d)}  # the baselines choose nothing
        if self.baseline:  # on a run in the activation-aware basis this *is* the activation-aware map
            base_map = ScoreMap.from_singular_values(pm)  # untrained: the adapters left out
            maps[base_map.method] = (base_map, {"adapters": False})
            ev_base = evaluate_score_maps({base_map.method: maps[base_map.method]}, reported, self.ratios, pm)
            for d in reported:
                ev["ppl"][d].update(ev_base["ppl"][d])
            for key in ("measured_ratio", "ranks", "adapters"):
                ev[key].update(ev_base[key])
        auto: dict[float, bool] = {}
        parts = [d for d in wins if is_validation(d) and d != VAL]
        if choose:
            dec = record_decision(sm, adapter_pairs(ev["ppl"][VAL], self.ratios),
                                  {part_name(d): adapter_pairs(ev["ppl"][d], self.ratios) for d in parts})
            auto = {r: dec[f"{float(r):g}"] for r in self.ratios}
            for key in ("ppl",):
                for d in ev[key]:
                    col = {r: ev[key][d]["acip_adapters" if auto[r] else "acip_no_adapters"][r] for r in self.ratios}
                    ev[key][d] = {"acip": col, **ev[key][d]}
            for key in ("measured_ratio", "ranks", "adapters"):
                col = {r: ev[key]["acip_adapters" if auto[r] else "acip_no_adapters"][r] for r in self.ratios}
                ev[key] = {"acip": col, **ev[key]}
            if trainer.is_global_zero:  # the decision travels with the run directory
                pm.score_map = sm
                pm.save_pretrained(self.run_dir)
        extra_maps = []
        if self.baseline and "singular_values" not in maps:  # a whitened run: plain SVD of W as well
            extra_maps.append(self.plain_singular_values(pm))
        if self.calib_windows and "activation_aware" not in maps:
            extra_maps.append(self.activation_aware(pm))
        for other_pm, other_map in extra_maps:
            ev_other = evaluate_score_maps({other_map.method: other_map}, reported, self.ratios, other_pm)
            for d in reported:
                ev["ppl"][d].update(ev_other["ppl"][d])
            for key in ("measured_ratio", "ranks", "adapters"):
                ev[key].update(ev_other[key])
        del extra_maps
        domains = [d for d in wins if not is_validation(d)]
        primary = domains[0]
        below = [r for r in self.ratios if r < 1.0] or self.ratios
        val_mean = _gmean([ev["ppl"][VAL]["acip"][r] for r in below])
        st = pl_module.schedule
        results = {
            "ratios": self.ratios,
            "domains": domains,
            "primary_domain": primary,
            "ppl": {m: _keys(d) for m, d in ev["ppl"][primary].items()},
            "ppl_by_domain": {dom: {m: _keys(d) for m, d in cols.items()} for dom, cols in ev["ppl"].items()
                              if not is_validation(dom)},
            "val_ppl": {m: _keys(d) for m, d in ev["ppl"][VAL].items()},
            "val_ppl_by_part": {part_name(p): {m: _keys(d) for m, d in ev["ppl"][p].items()} for p in parts},
            "val_ppl_mean": val_mean,
            "reference_ppl": {d: reference[d] for d in wins},
            "adapters_auto": _keys(auto) if auto else None,
            "adapters_used": {m: _keys(d) for m, d in ev["adapters"].items()},
            "measured_ratio": {m: _keys(d) for m, d in ev["measured_ratio"].items()},
            "ranks": {m: _keys(d) for m, d in ev["ranks"].items()},
            "stop_ratio": st.stop_ratio,
            "reached_stop_ratio": st.stop_step is not None,
            "stop_step": st.stop_step,
            "post_tune_steps": st.post_tune_done(trainer.global_step),
            "final_size_ratio": pm.size_ratio(),
            "global_step": int(trainer.global_step),
            "train_time_s": train_time,
            "eval_time_s": time.time() - t0,
            "eval": {"seq_len": self.seq_len,
                     "windows": {d: int(len(w)) for d, w in wins.items()},
                     "tokens": {d: int(w.numel()) for d, w in wins.items()},
                     "val_texts": len(self.val_texts), "heldout_texts": len(self.heldout_texts)},
            "world_size": trainer.world_size,
            "score_map_digests": list(pl_module.rank_digests),
            **self.extra,
        }
        atomic_write(self.run_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
        pdir = self.run_dir / "plots"
        names = list(sm.scores)
        shown = {d: ev["ppl"][d] for d in domains}
        pngs = {
            "ratio_vs_ppl": plot_domain_curves(shown, pdir / "ratio_vs_ppl.png", references=reference,
                                               title="perplexity by size ratio (dashed: uncompressed)"),
            "score_heatmap": plots.plot_score_heatmap(sm.scores, pdir / "score_heatmap.png"),
            "kept_ranks": plots.plot_kept_ranks(ev["ranks"]["acip"], {n: sm.scores[n].numel() for n in names},
                                                pdir / "kept_ranks.png"),
        }
        notes = {"acip adapters": {r: ("on" if auto[r] else "off") for r in self.ratios}} if auto else None
        parts = []
        for d in [*domains, VAL, *parts]:
            what = ("validation split (chooses the adapters; not reported as a domain)" if d == VAL else
                    f"validation split, component {part_name(d)!r} (the adapters must help on every component)"
                    if is_validation(d) else d)
            parts.append(f"[acip] {what}: perplexity by size ratio (target layers)\n"
                         + format_table(ev["ppl"][d], reference=reference[d], ratios=self.ratios, suffix=" ppl",
                                        notes=notes))
        print("\n" + "\n\n".join(parts) + f"\n[acip] final/val_ppl_mean {val_mean:.3f}", flush=True)
        self.log_results(trainer, ev, pngs, reference, val_mean, primary)
        return results

    @staticmethod
    def untrained_dense(pm: Any) -> Any:
        """A dense copy of the model before training: full ratio, no adapters (exactly the original W)."""
        import acip
        from acip import ScoreMap

        return acip.export(pm, 1.0, score_map=ScoreMap.from_singular_values(pm), adapters=False)

    def plain_singular_values(self, pm: Any) -> tuple[Any, Any]:
        """(plain-SVD parametrized copy of the untrained model, its singular-value score map)."""
        import acip
        from acip import ScoreMap

        plain = acip.parametrize(self.untrained_dense(pm), pm.acip_config.replace(basis="plain", lora=None))
        return plain, ScoreMap.from_singular_values(plain)

    def activation_aware(self, pm: Any) -> tuple[Any, Any]:
        """(whitened parametrized copy of the untrained model, its activation-aware score map)."""
        import acip
        from acip.eval.perplexity import token_windows

        calib = token_windows(self.tokenizer, self.calib_texts, self.seq_len, self.calib_windows)
        white = acip.activation_aware(self.untrained_dense(pm), calib.split(4), target_modules=list(pm.svd_layers()),
                                      svd_dtype=pm.acip_config.torch_svd_dtype)
        return white, white.score_map

    def log_results(self, trainer: pl.Trainer, ev: dict[str, Any], pngs: dict[str, Path],
                    reference: Mapping[str, float], val_mean: float, primary: str) -> None:
        """Scalars to every logger; images and a long-format table (every domain) to W&B."""
        from lightning.pytorch.loggers import WandbLogger

        scalars = {"final/val_ppl_mean": val_mean}
        for d, cols in ev["ppl"].items():
            scalars[f"final/{d}/ppl_dense"] = reference[d]
            for m, col in cols.items():
                for r, v in col.items():
                    scalars[metric_key(m, r, d)] = v
                    if d == primary:
                        scalars[metric_key(m, r)] = v
        cols = ["domain", "method", "ratio", "ppl", "x_dense", "measured_ratio", "adapters"]
        rows = [[d, "dense", 1.0, reference[d], 1.0, 1.0, False] for d in ev["ppl"]]
        for d, methods in ev["ppl"].items():
            for m, col in methods.items():
                for r in self.ratios:
                    used = ev["adapters"].get(m, {}).get(r)
                    rows.append([d, m, r, col[r], col[r] / reference[d], ev["measured_ratio"][m][r], bool(used)])
        for lg in trainer.loggers:
            lg.log_metrics(scalars, step=trainer.global_step)
            if isinstance(lg, WandbLogger):
                for key, path in pngs.items():
                    lg.log_image(key=f"plots/{key}", images=[str(path)], step=trainer.global_step)
                lg.log_table(key="final/results", columns=cols, data=rows, step=trainer.global_step)
