"""flex_attention fast paths (impl=flex) match the mask reference: forward and backward.

torch 2.13 runs flex_attention on CPU forward only ("FlexAttention does not support backward on CPU"), unfused.
So on CPU: the forward through the public API, and the backward through flex's own differentiable math fallback
with that device check lifted (this checks our mask_mods and block masks, not the kernel). The fused kernel's
forward + backward is checked on CUDA only.
"""

import dataclasses

import pytest
import torch

from topocl.attention import flex
from topocl.attention.nsa import NSAttention
from topocl.attention.split import SplitAttention
from topocl.config import ModelConfig, NSAConfig, SplitConfig
from topocl.model import GPT

NSA_SIZES = [dict(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=3, window=4),
             dict(cmp_block=4, cmp_stride=2, sel_block=8, n_sel=2, n_local=1, window=5)]
T = 37  # not a multiple of any block size


def pair(kind: str, dtype: torch.dtype, device: str = "cpu", **sizes):
    torch.manual_seed(0)
    if kind == "nsa":
        mods = [NSAConfig(**sizes, impl=i) for i in ("mask", "flex")]
        cfgs = [ModelConfig(d_model=32, n_head=4, n_kv_head=2, max_seq_len=64, attention="nsa", nsa=m) for m in mods]
        cls = NSAttention
    else:
        cfgs = [ModelConfig(d_model=32, n_head=4, n_kv_head=2, max_seq_len=64, attention="split",
                            split=SplitConfig(topk=5, impl=i)) for i in ("mask", "flex")]
        cls = SplitAttention
    ref, fast = cls(cfgs[0]), cls(cfgs[1])
    fast.load_state_dict(ref.state_dict())
    m = GPT(dataclasses.replace(cfgs[0], vocab_size=8, n_layer=1))
    cos, sin = m.rope_cos[:T].to(device, dtype), m.rope_sin[:T].to(device, dtype)
    return ref.to(device, dtype), fast.to(device, dtype), cos, sin


def run(m, x, cos, sin, backward: bool):
    xi = x.clone().requires_grad_(backward)
    y, aux = m(xi, cos, sin)
    if not backward:
        return y, aux, None, {}
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return y, aux, xi.grad, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def compare(ref, fast, cos, sin, dtype, backward: bool, tol: float) -> None:
    x = torch.randn(2, T, 32, dtype=dtype, device=cos.device)
    if backward:
        (y0, a0, gx0, gp0), (y1, a1, gx1, gp1) = run(ref, x, cos, sin, True), run(fast, x, cos, sin, True)
    else:
        with torch.no_grad():
            (y0, a0, gx0, gp0), (y1, a1, gx1, gp1) = run(ref, x, cos, sin, False), run(fast, x, cos, sin, False)
    assert (y0 - y1).abs().max().item() < tol
    assert {k: v.item() for k, v in a0.items()} == pytest.approx({k: v.item() for k, v in a1.items()}, abs=1e-6)
    if backward:
        assert (gx0 - gx1).abs().max().item() < tol
        assert gp0.keys() == gp1.keys() and all((gp0[n] - gp1[n]).abs().max().item() < tol for n in gp0)


@pytest.mark.parametrize("sizes", NSA_SIZES)
def test_nsa_flex_forward_matches_mask_on_cpu(sizes):
    ref, fast, cos, sin = pair("nsa", torch.float32, **sizes)
    compare(ref, fast, cos, sin, torch.float32, backward=False, tol=1e-5)


def test_split_flex_forward_matches_mask_on_cpu():
    ref, fast, cos, sin = pair("split", torch.float32)
    compare(ref, fast, cos, sin, torch.float32, backward=False, tol=1e-5)


@pytest.mark.parametrize("kind,sizes", [("nsa", NSA_SIZES[0]), ("nsa", NSA_SIZES[1]), ("split", {})])
def test_flex_backward_matches_mask_through_the_math_fallback(kind, sizes, monkeypatch):
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)  # CPU backward: flex's eager math path
    ref, fast, cos, sin = pair(kind, torch.float32, **sizes)
    compare(ref, fast, cos, sin, torch.float32, backward=True, tol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused flex_attention kernel (forward + backward) "
                    "needs CUDA; on CPU torch 2.13 has no flex backward (covered above via the math fallback)")
@pytest.mark.parametrize("kind,sizes", [("nsa", NSA_SIZES[0]), ("split", {})])
def test_flex_kernel_matches_mask_on_cuda(kind, sizes):
    ref, fast, cos, sin = pair(kind, torch.float32, device="cuda", **sizes)
    compare(ref, fast, cos, sin, torch.float32, backward=True, tol=2e-4)


def test_auto_resolves_to_flex_only_on_cuda():
    assert flex.resolve_impl("auto", torch.device("cpu")) == "block"  # the kind's CPU path
    assert flex.resolve_impl("auto", torch.device("cpu"), "gather") == "gather"
    assert flex.resolve_impl("auto", torch.device("cuda")) == ("flex" if flex.flex_available() else "block")
    assert flex.resolve_impl("gather", torch.device("cuda")) == "gather"
    with pytest.raises(ValueError, match="split.impl"):
        SplitAttention(ModelConfig(d_model=32, n_head=4, n_kv_head=2, attention="split",
                                   split=SplitConfig(impl="fast")))
