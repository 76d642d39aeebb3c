"""SVDLinear: exact at start, never materialises W, straight-through mask, costs, LoRA folding."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from acip.core.svd_linear import SVDLinear, rank_cost, straight_through_mask


def _linear(out_f=48, in_f=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("shape", [(48, 40), (40, 48), (32, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_exact_at_start(shape, bias):
    lin = _linear(*shape, bias=bias)
    layer = SVDLinear.from_linear(lin, mask_scaling=2e-2)
    x = torch.randn(5, 7, shape[1])
    ref = lin(x)
    err = (layer(x) - ref).norm() / ref.norm()
    assert err <= 1e-5
    assert layer.max_rank == min(shape)


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_forward_never_materialises_w():
    # k = min(in, out) makes one factor W-shaped, so prune half the directions: then no op may
    # produce an out x in (or in x out) tensor, forward or backward.
    lin = _linear(48, 40)
    layer = SVDLinear.from_linear(lin)
    with torch.no_grad():
        layer.mask[20:] = -1.0
    x = torch.randn(3, 40)
    rec = _ShapeRecorder()
    with rec:
        layer(x).sum().backward()
    assert (48, 40) not in rec.shapes and (40, 48) not in rec.shapes


def test_straight_through_value_and_gradient():
    m = torch.tensor([0.5, -0.1, 0.0, 2.0], requires_grad=True)
    g = straight_through_mask(m, 0.02)
    assert torch.equal(g.detach(), torch.tensor([0.02, 0.0, 0.0, 0.02]))
    g.sum().backward()
    assert torch.equal(m.grad, torch.tensor([1.0, 0.0, 0.0, 1.0]))  # d ReLU(m)/dm


def test_pruned_directions_drop_out_exactly():
    lin = _linear(48, 40)
    layer = SVDLinear.from_linear(lin)
    with torch.no_grad():
        layer.mask[::2] = -1.0
    keep = torch.arange(1, 40, 2)
    u, s, vh = torch.linalg.svd(lin.weight.double(), full_matrices=False)
    w_r = (u[:, keep] * s[keep]) @ vh[keep]
    x = torch.randn(4, 40)
    ref = x.double() @ w_r.t() + lin.bias.double()
    assert torch.allclose(layer(x).double(), ref, atol=1e-5)
    assert layer.active_rank() == 20
    assert layer.mask.grad is None
    layer(x).sum().backward()
    assert torch.all(layer.mask.grad[::2] == 0) and torch.any(layer.mask.grad[1::2] != 0)


def test_cost_dense_cap():
    assert rank_cost(0, 40, 48) == 0
    assert rank_cost(10, 40, 48) == 880
    assert rank_cost(22, 40, 48) == 1920  # 22*88=1936 > 40*48 -> dense
    assert rank_cost(40, 40, 48, bias=True) == 1920 + 48
    layer = SVDLinear.from_linear(_linear(48, 40))
    assert [layer.cost(r) for r in (0, 21, 22, 40)] == [48, 21 * 88 + 48, 1968, 1968]


def test_lora_fold_is_exact_rank_r_best_approximation():
    lin = _linear(48, 40)
    layer = SVDLinear.from_linear(lin)
    layer.add_lora(r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    keep = torch.arange(0, 12)
    up, down = layer.factors(keep)
    assert up.shape == (48, 12) and down.shape == (12, 40)
    # W_eff restricted to the kept directions + LoRA, then truncated to rank 12 by SVD
    u = layer.ortho[:, keep].double() * layer.mask_scaling
    w = u @ layer.base[keep].double() + layer.lora_scaling * layer.lora_B.double() @ layer.lora_A.double()
    uu, ss, vv = torch.linalg.svd(w, full_matrices=False)
    best = (uu[:, :12] * ss[:12]) @ vv[:12]
    assert torch.linalg.matrix_rank(up.double() @ down.double()) == 12
    assert torch.allclose(up.double() @ down.double(), best, atol=1e-5)


def test_refuses_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        SVDLinear.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="mask_scaling"):
        SVDLinear.from_linear(_linear(), mask_scaling=0.0)


@pytest.mark.parametrize("whitened", [False, True])
def test_lora_fold_structured_and_generic_paths_agree(whitened):
    lin = _linear(40, 48)
    lw = None
    if whitened:
        x = torch.randn(200, 48)
        lw = torch.linalg.cholesky(x.t() @ x + 1e-3 * torch.eye(48))
    layer = SVDLinear.from_linear(lin, whitening=lw)
    layer.add_lora(r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    keep = torch.tensor([0, 2, 3, 5, 7, 11, 13, 17, 19, 23])
    up, down = layer.factors(keep)
    u = layer.ortho[:, keep].double() * layer.mask_scaling
    w = u @ layer.base[keep].double() + layer.lora_scaling * layer.lora_B.double() @ layer.lora_A.double()
    uu, ss, vv = torch.linalg.svd(w, full_matrices=False)
    best = (uu[:, :10] * ss[:10]) @ vv[:10]
    assert torch.allclose(up.double() @ down.double(), best, atol=1e-5)
