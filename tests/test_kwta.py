"""k-WTA FFN (`kwta`) and two-system FFN (`dual`): exact k, dense at ρ = 1, gradients, roles, parameter match."""

import math

import pytest
import torch

from topocl.config import KWTAConfig, ModelConfig
from topocl.kwta import KWTA, DualFFN, active_units, dual_sizes, kwta
from topocl.model import GPT


def cfg(ffn: str = "kwta", **kw) -> ModelConfig:
    return ModelConfig(vocab_size=40, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=40, ffn=ffn,
                       kwta=KWTAConfig(**kw))


@pytest.mark.parametrize("rho", [1.0, 0.5, 0.25, 0.1, 0.05])
@pytest.mark.parametrize("hidden", [96, 320, 352, 683])
def test_exactly_ceil_rho_h_units_are_active_per_token(rho, hidden):
    k = active_units(rho, hidden)
    assert k == max(1, math.ceil(round(rho * hidden, 9)))  # ⌈ρH⌉ without float dust (0.1·320 -> 32)
    torch.manual_seed(0)
    h = torch.randn(3, 7, hidden)
    out = kwta(h, k)
    nonzero = (out != 0).sum(-1)  # [3, 7]
    assert bool((nonzero == k).all())
    kept = out != 0  # the kept units are the k largest |h| of each token, unchanged
    assert torch.equal(out[kept], h[kept])
    assert bool((h.abs().masked_fill(kept, -1).amax(-1) <= h.abs().masked_fill(~kept, math.inf).amin(-1)).all())


def test_hand_computed_kwta():
    h = torch.tensor([[0.5, -3.0, 1.0, 2.0, -0.1]])
    assert active_units(0.4, 5) == 2 and active_units(0.41, 5) == 3 and active_units(0.01, 5) == 1
    assert torch.equal(kwta(h, 2), torch.tensor([[0.0, -3.0, 0.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="rho"):
        active_units(0.0, 5)


def test_rho_one_is_the_plain_mlp_bit_for_bit():
    torch.manual_seed(0)
    dense = GPT(cfg("mlp"))
    torch.manual_seed(0)
    sparse = GPT(cfg("kwta", rho=1.0))
    assert list(dense.state_dict()) == list(sparse.state_dict())  # same names: checkpoints interchange
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), sparse.state_dict().values()))
    assert dense.params_by_role() == sparse.params_by_role()
    x = torch.randint(0, 40, (2, 16))
    a, b = dense(x, x), sparse(x, x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    for (n, p), q in zip(dense.named_parameters(), sparse.parameters()):
        assert torch.equal(p.grad, q.grad), n
    assert b.aux["stat.ffn_active"].item() == pytest.approx(1.0)


def test_masked_gradient_leaves_losing_units_untouched_and_straight_through_is_dense():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, dtype=torch.float64)  # one token: its losers get no gradient at all
    ffn = KWTA(cfg(rho=0.25)).double()
    ffn(x)[0].square().sum().backward()
    h = torch.nn.functional.silu(ffn.gate(x)) * ffn.up(x)
    won = (kwta(h, ffn.k) != 0)[0, 0]  # [H]
    assert int(won.sum()) == ffn.k == 24  # ⌈0.25 · 96⌉ (d_ff 96)
    assert bool((ffn.gate.weight.grad[~won] == 0).all()) and bool((ffn.up.weight.grad[~won] == 0).all())
    assert bool((ffn.gate.weight.grad[won].abs().sum(1) > 0).all())
    assert bool((ffn.down.weight.grad[:, ~won] == 0).all())

    st = KWTA(cfg(rho=0.25, grad="straight_through")).double()
    st.load_state_dict(ffn.state_dict())
    hs = (torch.nn.functional.silu(st.gate(x)) * st.up(x)).detach().requires_grad_(True)
    y = st.down(kwta(hs, st.k, "straight_through"))
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert torch.allclose(hs.grad, g @ st.down.weight, atol=1e-12)  # dense gradient on every unit
    assert torch.equal(st(x)[0], ffn(x)[0])  # same forward pass as the masked one
    with pytest.raises(ValueError, match="grad"):
        KWTA(cfg(grad="sideways"))


def test_dual_roles_parameter_match_and_fast_pathway():
    torch.manual_seed(0)
    dense, dual = GPT(cfg("mlp")), GPT(cfg("dual", rho=0.1, fast_frac=0.5))
    assert dense.num_params() == dual.num_params()  # H_slow + H_fast = d_ff
    roles = set(dual.param_roles().values())
    assert {"ffn.slow_units", "ffn.fast_units"} <= roles and "mlp" not in roles
    assert dual.pathway_roles() == ({"ffn.slow_units"}, {"ffn.fast_units"})
    assert dual_sizes(96, 0.5) == (48, 48) and dual_sizes(96, 0.25) == (72, 24)
    ffn = dual.blocks[0].ffn
    assert ffn.fast.k == 5 and ffn.slow.k == 48  # ⌈0.1 · 48⌉, slow dense
    h = torch.randn(2, 5, 32)
    with dual.fast_pathway(False):
        only_slow = ffn(h)[0]
    assert torch.equal(only_slow, ffn.slow(h)[0])
    assert not torch.allclose(ffn(h)[0], only_slow)
    with pytest.raises(ValueError, match="fast_frac"):
        DualFFN(cfg("dual", fast_frac=0.0))


def test_dense_dual_is_an_mlp_split_in_two():
    """Both pathways at ρ = 1: the dual FFN equals the MLP whose hidden units are the two pathways' concatenated."""
    torch.manual_seed(0)
    dual = DualFFN(cfg("dual", rho=1.0, slow_rho=1.0, fast_frac=0.25)).double()
    mlp = GPT(cfg("mlp")).blocks[0].ffn.double()
    with torch.no_grad():
        for name in ("gate", "up"):
            getattr(mlp, name).weight.copy_(torch.cat([getattr(dual.slow, name).weight,
                                                       getattr(dual.fast, name).weight]))
        mlp.down.weight.copy_(torch.cat([dual.slow.down.weight, dual.fast.down.weight], dim=1))
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    assert torch.allclose(dual(x)[0], mlp(x)[0], atol=1e-12)


def test_kwta_model_is_causal():
    torch.manual_seed(0)
    m = GPT(cfg("kwta", rho=0.1)).double()
    x = torch.randint(0, 40, (1, 20))
    x2 = x.clone()
    x2[:, 12:] = (x2[:, 12:] + 1) % 40
    assert (m(x).logits[:, :12] - m(x2).logits[:, :12]).abs().max().item() <= 1e-12
