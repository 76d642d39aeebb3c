"""Objectives: CE, distillation from the dense view (KD) and CE+KD; what each does at initialisation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from acip.train.module import ACIPModule
from acip.train.objectives import CrossEntropy, Distillation, kl_divergence, topk_kl_divergence
from acip.train.schedule import ACIPSchedule
from acip.train.sources import topk_logprobs
from helpers_train import tiny_base, tiny_pm

CONF = Path(__file__).resolve().parents[1] / "conf" / "objective"


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(seed))


def mask_grads(pm) -> list[torch.Tensor]:
    return [m.grad if m.grad is not None else torch.zeros_like(m) for m in pm.mask_parameters()]


def test_kd_is_exactly_zero_at_init_with_zero_gradient_then_reaches_the_masks_once_pruned():
    pm = tiny_pm(lora={"r": 2, "lora_alpha": 4})  # LoRA B = 0 at init
    x = ids()
    kd = Distillation(temperature=2.0)
    loss, parts = kd(pm, x)
    assert float(loss.detach()) == 0.0 and parts == {"kd": 0.0}
    loss.backward()
    at_init = max(float(g.abs().max()) for g in mask_grads(pm))
    assert at_init < 1e-6, "pure KD has no gradient at init (only float rounding of softmax sums)"
    pm.zero_grad(set_to_none=True)
    layer = list(pm.svd_layers().values())[-1]  # down_proj: its top direction
    with torch.no_grad():
        layer.mask[0] = -1.0  # prune one direction: the student now differs from the teacher
    loss, _ = kd(pm, x)
    assert float(loss.detach()) > 0.0
    loss.backward()
    grads = mask_grads(pm)
    assert max(float(g.abs().max()) for g in grads) > 1e3 * max(at_init, 1e-12)
    assert sum(int((g != 0).any()) for g in grads) >= len(grads) - 1, "the masks get a signal"


def test_teacher_is_the_uncompressed_base_model_and_takes_no_gradient():
    x = ids()
    with torch.no_grad():
        ref = tiny_base()(input_ids=x).logits
    pm = tiny_pm(lora={"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for m in pm.mask_parameters():
            m[::2] = -1.0
        for p in pm.lora_parameters():
            p.add_(0.5)
    teacher = Distillation().teacher_logits(pm, x)
    assert not teacher.requires_grad
    torch.testing.assert_close(teacher, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pm(input_ids=x).logits, ref, atol=1e-3)  # the student is the pruned model


def test_kl_divergence_formula_with_temperature():
    t, s = torch.randn(3, 4, 50), torch.randn(3, 4, 50)
    T = 3.0
    p = F.softmax(t / T, -1)
    want = (p * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert float(kl_divergence(t, s, T)) == pytest.approx(float(want), rel=1e-6)
    assert float(kl_divergence(t.half(), t.half(), T)) == 0.0
    assert kl_divergence(t.bfloat16(), s.bfloat16()).dtype == torch.float32


def test_ce_kd_is_the_weighted_sum_and_ce_matches_the_old_task_loss():
    pm = tiny_pm()
    x = ids()
    with torch.no_grad():
        for m in pm.mask_parameters():
            m[-3:] = -1.0
        logits = pm(input_ids=x).logits
    ce_ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), x[:, 1:].reshape(-1))
    ce, parts = CrossEntropy()(pm, x)
    assert float(ce) == pytest.approx(float(ce_ref), rel=1e-6) and parts == {"ce": pytest.approx(float(ce_ref))}
    kd, _ = Distillation(temperature=1.5)(pm, x)
    both, parts = Distillation(temperature=1.5, kd_weight=0.25, ce_weight=2.0)(pm, x)
    assert float(both) == pytest.approx(2.0 * float(ce) + 0.25 * float(kd), rel=1e-5)
    assert set(parts) == {"ce", "kd"}


def test_module_uses_the_objective_and_logs_its_parts():
    pm = tiny_pm()
    module = ACIPModule(pm, lr=1e-3, lora_lr=1e-3, schedule=ACIPSchedule(l1_init=0.5),
                        objective=Distillation(ce_weight=1.0))
    x = ids()
    loss = module.training_step({"input_ids": x}, 0)
    assert module.last["kd"] == 0.0 and module.last["ce"] == pytest.approx(module.last["task_loss"], rel=1e-6)
    assert float(loss) == pytest.approx(module.last["task_loss"] + 0.5 * module.last["l1_loss"], rel=1e-5)
    assert isinstance(ACIPModule(tiny_pm(), lr=1e-3, lora_lr=1e-3).objective, CrossEntropy)  # the default


@pytest.mark.parametrize("name, cls, ce_w", [("ce", CrossEntropy, None), ("kd", Distillation, 0.0),
                                             ("ce_kd", Distillation, 1.0)])
def test_config_group_instantiates(name, cls, ce_w):
    obj = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    assert isinstance(obj, cls) and obj.name == name
    if ce_w is not None:
        assert obj.ce_weight == ce_w and obj.temperature == 1.0


@pytest.mark.parametrize("kw, msg", [({"temperature": 0.0}, "temperature"), ({"kd_weight": -1.0}, "kd_weight"),
                                     ({"kd_weight": 0.0}, "both 0"), ({"ce_weight": float("inf")}, "ce_weight")])
def test_bad_settings_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Distillation(**kw)


def full_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's top-k at every position (what data=self_generated caches)."""
    return topk_logprobs(tiny_base(), x, k)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_cached_top_k_with_the_whole_vocabulary_is_the_dense_teacher_kd(T):
    pm = tiny_pm(lora={"r": 2, "lora_alpha": 4})
    x = ids()
    with torch.no_grad():
        for m in pm.mask_parameters():
            m[::2] = -1.0  # the student differs from the teacher
        for p in pm.lora_parameters():
            p.add_(0.5)
        t_logp, t_ids = F.log_softmax(Distillation().teacher_logits(pm, x).float(), -1).topk(50, -1)  # K = V
    for ce_w in (0.0, 1.5):
        obj = Distillation(temperature=T, ce_weight=ce_w)
        dense, dparts = obj(pm, x)
        cached, cparts = obj(pm, x, teacher_ids=t_ids, teacher_logp=t_logp)
        assert dparts["kd"] > 1e-3 and float(cached) == pytest.approx(float(dense), rel=1e-4)  # fp32 rounding
        assert set(cparts) == set(dparts) and cparts["kd"] == pytest.approx(dparts["kd"], rel=1e-4)
    s = torch.randn(2, 10, 50)
    assert float(topk_kl_divergence(s, t_ids, t_logp, T)) == pytest.approx(
        float(kl_divergence(Distillation().teacher_logits(pm, x), s, T)), rel=1e-4)


def test_cached_top_k_kd_is_the_kl_of_the_top_k_plus_a_tail_bucket():
    t, s = torch.randn(3, 5, 50) * 3, torch.randn(3, 5, 50) * 3
    lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    k_ids = lp.topk(8, -1).indices
    p, q = lp.exp().gather(-1, k_ids), lq.exp().gather(-1, k_ids)
    p, q = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1), torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    got = topk_kl_divergence(s, k_ids, lp.gather(-1, k_ids))
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert 0 < float(got) < float(kl_divergence(t, s)), "the reduced KL is a lower bound of the full one"
    assert float(topk_kl_divergence(t, k_ids, lp.gather(-1, k_ids), 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_cached_kd_is_about_zero_at_init_and_its_gradient_reaches_the_masks_once_pruned():
    pm = tiny_pm(lora={"r": 2, "lora_alpha": 4})
    x = ids()
    t_ids, t_logp = full_topk(x, 8)  # the base model itself: the SVD reconstruction error remains
    kd = Distillation()
    for logp in (t_logp.half(), t_logp):  # float16: as data.teacher_dtype=float16 stores it
        loss, parts = kd(pm, x, teacher_ids=t_ids, teacher_logp=logp)
        assert abs(float(loss)) < 1e-7 and set(parts) == {"kd"}
    loss.backward()
    at_init = max(float(g.abs().max()) for g in mask_grads(pm))  # float32 teacher: the SVD error alone
    pm.zero_grad(set_to_none=True)
    with torch.no_grad():
        for m in pm.mask_parameters():
            m[::2] = -1.0
    loss, _ = kd(pm, x, teacher_ids=t_ids, teacher_logp=t_logp)
    assert float(loss) > 100 * 1e-7
    loss.backward()
    grads = mask_grads(pm)
    assert max(float(g.abs().max()) for g in grads) > 1e3 * at_init
    assert sum(int((g != 0).any()) for g in grads) >= len(grads) - 1, "the masks get a signal"
    with pytest.raises(ValueError, match="only one of"):
        kd(pm, x, teacher_ids=t_ids)


def test_module_hands_the_batch_s_cached_teacher_to_the_objective():
    pm = tiny_pm()
    x = ids()
    t_ids, t_logp = full_topk(x, 8)
    seen = []

    class Spy(Distillation):
        def teacher_logits(self, pm, input_ids):  # the dense path must not run
            seen.append("dense")
            return super().teacher_logits(pm, input_ids)

    module = ACIPModule(pm, lr=1e-3, lora_lr=1e-3, objective=Spy(ce_weight=1.0))
    module.training_step({"input_ids": x, "teacher_ids": t_ids, "teacher_logp": t_logp}, 0)
    assert seen == [] and module.last["kd"] < 1e-4 and module.last["ce"] > 1.0
    assert module.last["ce"] == pytest.approx(float(CrossEntropy()(pm, x)[0]), rel=1e-5)
    module.training_step({"input_ids": x}, 0)
    assert seen == ["dense"]
    module = ACIPModule(tiny_pm(), lr=1e-3, lora_lr=1e-3)  # CE ignores a cached teacher
    module.training_step({"input_ids": x, "teacher_ids": t_ids, "teacher_logp": t_logp}, 0)


# ------------------------------------------------------------------ the cached teacher for packed text
def test_packed_teacher_topk_equals_the_dense_models_top_k_and_is_cached_by_the_rows(tmp_path, monkeypatch):
    import acip.train.sources as sources

    monkeypatch.setenv("ACIP_CACHE_DIR", str(tmp_path))
    key = {"_target_": "tiny", "seed": 0}
    rows = ids(3)
    want_ids, want_logp = full_topk(rows, 8)
    got_ids, got_logp = sources.packed_teacher_topk(tiny_base(), rows, 8, "float32", model_key=key, progress=False)
    assert got_ids.dtype == torch.int32 and torch.equal(got_ids.long(), want_ids)
    assert torch.allclose(got_logp, want_logp, atol=1e-6)
    files = list((tmp_path / "teacher_topk").glob("*.safetensors"))
    assert len(files) == 1

    def no_forward(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(sources, "topk_logprobs", no_forward)
    again = sources.packed_teacher_topk(tiny_base(), rows, 8, "float32", model_key=key, progress=False)
    assert torch.equal(again[0], got_ids) and torch.equal(again[1], got_logp)
    with pytest.raises(AssertionError, match="cache"):  # other rows, other model or other k: another entry
        sources.packed_teacher_topk(tiny_base(), ids(4), 8, "float32", model_key=key, progress=False)
    with pytest.raises(AssertionError, match="cache"):
        sources.packed_teacher_topk(tiny_base(), rows, 8, "float32", model_key={**key, "seed": 1}, progress=False)
    with pytest.raises(AssertionError, match="cache"):
        sources.packed_teacher_topk(tiny_base(), rows, 4, "float32", model_key=key, progress=False)
    raw = bytearray(files[0].read_bytes())  # a damaged entry is recomputed, with a warning
    raw[-3] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    monkeypatch.undo()
    monkeypatch.setenv("ACIP_CACHE_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="damaged"):
        fixed = sources.packed_teacher_topk(tiny_base(), rows, 8, "float32", model_key=key, progress=False)
    assert torch.equal(fixed[0], got_ids)


@pytest.mark.parametrize("kw, msg", [({"k": 0}, "teacher_topk must be an integer >= 1"),
                                     ({"dtype": "bfloat16"}, "teacher_dtype"),
                                     ({"rows": torch.zeros(5, dtype=torch.long)}, r"shape \(rows, seq_len\)")])
def test_packed_teacher_topk_names_bad_settings(kw, msg):
    from acip.train.sources import packed_teacher_topk

    with pytest.raises(ValueError, match=msg):
        packed_teacher_topk(tiny_base(), kw.get("rows", ids()), kw.get("k", 4), kw.get("dtype", "float16"))


def test_packed_teacher_topk_refuses_more_memory_than_its_limit(monkeypatch):
    import acip.train.sources as sources

    monkeypatch.setattr(sources, "TEACHER_TOPK_MAX_BYTES", 500)
    with pytest.raises(ValueError, match=r"GiB.*objective.teacher_topk=0"):
        sources.packed_teacher_topk(tiny_base(), ids(), 8)  # 2 x 10 x 8 x (4 + 2) bytes = 960
    assert sources.packed_teacher_topk(tiny_base(), ids()[:, :5], 8, model_key=None, progress=False)[0].shape == (2, 5, 8)


def test_objective_teacher_topk_setting_is_validated_and_off_without_kd():
    assert Distillation(ce_weight=1.0, teacher_topk=64).teacher_topk == 64
    assert Distillation(ce_weight=1.0, kd_weight=0.0, teacher_topk=64).teacher_topk == 0  # no KD term, no teacher
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="teacher_topk"):
            Distillation(teacher_topk=bad)
    with pytest.raises(ValueError, match="teacher_dtype"):
        Distillation(teacher_dtype="int8")
    for name in ("kd", "ce_kd"):
        assert instantiate(OmegaConf.load(CONF / f"{name}.yaml")).teacher_topk == 64


def test_text_rows_get_the_dense_models_top_k_before_parametrizing_and_train_without_a_teacher_forward():
    """A run on packed text with objective.teacher_topk: the lazy build gives the datamodule's rows the
    dense model's top-k first, batches carry it, and the step never runs the dense teacher."""
    import acip
    from acip.train.run import attach_teacher, parametrizer
    from test_train_module import tiny_data

    dm = tiny_data(4)
    rows = dm.prepare().clone()
    base = tiny_base()
    want_ids, want_logp = topk_logprobs(tiny_base(), rows, 8)
    objective = Distillation(ce_weight=1.0, teacher_topk=8, teacher_dtype="float32")
    seen = []

    def teacher(m):
        seen.append(type(m.model.layers[0].self_attn.q_proj).__name__)  # still the dense nn.Linear
        assert attach_teacher(dm, m, objective.teacher_topk, objective.teacher_dtype)

    pm = parametrizer(base, acip.ACIPConfig(), None, torch.random.get_rng_state(), teacher=teacher)("cpu")
    assert seen == ["Linear"]
    assert torch.equal(dm.extras["teacher_ids"].long(), want_ids)
    assert torch.allclose(dm.extras["teacher_logp"], want_logp, atol=1e-6)
    assert not attach_teacher(dm, base, 8)  # rows that carry a teacher keep it
    dm.total_steps = 1
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "teacher_ids", "teacher_logp"}
    dense_calls = []

    class Spy(Distillation):
        def teacher_logits(self, pm, input_ids):
            dense_calls.append(1)
            return super().teacher_logits(pm, input_ids)

    module = ACIPModule(pm, lr=1e-3, lora_lr=1e-3, objective=Spy(ce_weight=1.0, teacher_topk=8))
    module.training_step(batch, 0)
    assert dense_calls == [] and module.last["kd"] < 1e-4 and module.last["ce"] > 1.0


def test_a_ce_kd_run_on_text_caches_the_teacher_top_k_once_and_finishes(tmp_path):
    import json

    from helpers_train import child_env, run_compress

    env = child_env(ACIP_CACHE_DIR=str(tmp_path / "cache"))
    proc = run_compress(tmp_path / "run", "objective=ce_kd", "eval.baseline=false",
                        "eval.activation_aware_windows=0", "eval.domains=[heldout]", env=env)
    out = proc.stdout + proc.stderr
    assert "the teacher's top-64 of" in out and "one forward of the base model" in out
    assert len(list((tmp_path / "cache" / "teacher_topk").glob("*.safetensors"))) == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["reached_stop_ratio"] and (tmp_path / "run" / "score_map.safetensors").is_file()
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").objective.teacher_topk == 64
