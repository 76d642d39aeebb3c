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
