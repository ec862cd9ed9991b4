import pytest
import torch

from topocl.model import GPT


def test_forward_shapes_and_loss(tiny_cfg):
    torch.manual_seed(0)
    m = GPT(tiny_cfg)
    x = torch.randint(0, 64, (3, 16))
    out = m(x, x)
    assert out.logits.shape == (3, 16, 64) and out.logits.dtype == torch.float32
    # untrained model at init is close to uniform: loss near ln(V)
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.3
    assert torch.equal(out.loss, out.lm_loss)  # dense has no aux losses


def test_ignore_index_targets(tiny_cfg):
    m = GPT(tiny_cfg)
    x = torch.randint(0, 64, (2, 8))
    y = x.clone()
    y[:, 4:] = -1
    full = torch.nn.functional.cross_entropy(m(x).logits[:, :4].reshape(-1, 64), x[:, :4].reshape(-1))
    assert torch.allclose(m(x, y).lm_loss, full, atol=1e-6)


def test_causality_exact_float64(tiny_cfg):
    torch.manual_seed(0)
    m = GPT(tiny_cfg).double()
    x = torch.randint(0, 64, (2, 20))
    t = 11
    x2 = x.clone()
    x2[:, t:] = torch.randint(0, 64, (2, 20 - t))
    a, b = m(x).logits, m(x2).logits
    assert (a[:, :t] - b[:, :t]).abs().max().item() <= 1e-12
    assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-6  # the perturbation is visible afterwards


def test_every_parameter_has_exactly_one_role(tiny_cfg):
    m = GPT(tiny_cfg)
    roles = m.param_roles()
    assert set(roles) == {n for n, _ in m.named_parameters()}
    assert set(roles.values()) == {"embed", "head", "norm.attn", "norm.ffn", "norm.final", "attn.q", "attn.k",
                                   "attn.v", "attn.o", "mlp"}
    assert sum(m.params_by_role().values()) == m.num_params()


def test_sequence_too_long_is_an_error(tiny_cfg):
    m = GPT(tiny_cfg)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_greedy_generate_is_deterministic(tiny_cfg):
    torch.manual_seed(0)
    m = GPT(tiny_cfg).eval()
    x = torch.randint(0, 64, (2, 5))
    a, b = m.generate(x, 6), m.generate(x, 6)
    assert a.shape == (2, 11) and torch.equal(a, b) and torch.equal(a[:, :5], x)
