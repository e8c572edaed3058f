"""ISMoE's batched experts: all experts of a layer in one grouped matmul (eager) or one wide FFN (export)."""

import pytest
import torch
from conftest import tiny_model

from mpismoe_edge.side.experts import straight_through
from mpismoe_edge.side.moe import expert_stack, grouped_mm, grouped_mm_loop, routed_mixture, wide_mixture
from mpismoe_edge.side.router import load_balance_loss, z_loss


def _moe(**side):
    """A side-MoE layer with every parameter (biases too, which may start at zero) away from its init."""
    torch.manual_seed(0)
    moe = tiny_model(**side).side.moe_layers()[0].train()
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return moe


def _inputs(moe, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    dim = moe.experts[0].fc1.in_features
    x = torch.randn(2, 5, dim, generator=gen, requires_grad=True)
    bb_token = torch.randn(2, 5, dim, generator=gen, requires_grad=True)
    bb_hidden = torch.randn(2, 5, 64, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return x, bb_token, bb_hidden, mask


def _loop(moe, x, bb_token, bb_hidden, mask):
    """The reference: each expert's own forward on every token, weighted by its routing weight."""
    weights, _ = moe.router(x, bb_token, bb_hidden, mask)
    weights = weights * mask.unsqueeze(-1)
    out = sum(weights[..., e : e + 1] * expert(x) for e, expert in enumerate(moe.experts))
    return out if moe.shared is None else out + moe.shared(x)


@pytest.mark.parametrize("expert_bits", [None, 4])
@pytest.mark.parametrize("shared_expert", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_batched_experts_equal_a_loop_over_the_experts_in_outputs_and_gradients(top_k, shared_expert, expert_bits):
    moe = _moe(top_k=top_k, shared_expert=shared_expert, expert_bits=expert_bits)
    inputs = _inputs(moe)
    wrt = [inputs[0], inputs[1], *moe.parameters()]
    probe = torch.randn(2, 5, inputs[0].shape[-1], generator=torch.Generator().manual_seed(2))
    want = _loop(moe, *inputs)
    want_grads = torch.autograd.grad((want * probe).sum(), wrt, allow_unused=True)
    got = moe(*inputs)
    got_grads = torch.autograd.grad((got * probe).sum(), wrt, allow_unused=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for g, ref in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (ref is None)
        if g is not None:
            torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)


def _routed(x, weights, w1, b1, w2, b2):
    return routed_mixture(x, weights, w1, b1, w2, b2)


def _wide(x, weights, w1, b1, w2, b2):
    """The export's form over the stacked experts: fc1 ``[E*H, D]``, fc2 ``[D, E*H]``."""
    fc1, fc2 = w1.flatten(0, 1), w2.permute(1, 0, 2).flatten(1)
    return wide_mixture(
        x, weights, lambda h: torch.nn.functional.linear(h, fc1, b1.flatten()), lambda h: h @ fc2.t(), b2
    )


@pytest.mark.parametrize("mixture", [_routed, _wide], ids=["routed (training)", "wide (export)"])
def test_experts_a_token_does_not_pick_get_zero_gradient_from_it(mixture):
    moe = _moe(expert_bits=4)
    x = torch.randn(3, moe.experts[0].fc1.in_features)
    weights = torch.zeros(3, len(moe.experts))
    weights[:, 0], weights[:, 2] = 0.7, 0.3  # experts 1 and 3: picked by no token
    mixture(x, weights, *expert_stack(moe.experts)).square().sum().backward()
    for e, expert in enumerate(moe.experts):
        grads = [p.grad for p in expert.parameters()]
        assert all((g == 0).all() for g in grads) == (e in (1, 3))


def test_routed_and_wide_mixtures_are_the_same_sum():
    moe = _moe(expert_bits=4)
    x = torch.randn(2, 5, moe.experts[0].fc1.in_features)
    weights, _ = moe.router(x, x, torch.randn(2, 5, 64), None)
    stack = expert_stack(moe.experts)
    torch.testing.assert_close(_routed(x, weights, *stack), _wide(x, weights, *stack), atol=1e-6, rtol=1e-5)


def test_no_routed_token_gives_a_zero_mixture():
    moe = _moe()
    x = torch.randn(4, moe.experts[0].fc1.in_features)
    out = routed_mixture(x, torch.zeros(4, len(moe.experts)), *expert_stack(moe.experts))
    assert out.shape == x.shape and (out == 0).all()


@pytest.mark.parametrize("k,m", [(8, 12), (6, 5)], ids=["16-byte rows", "unaligned rows"])
def test_grouped_matmul_equals_one_matmul_per_block_with_empty_blocks(k, m):
    a = torch.randn(10, k, requires_grad=True)
    b = torch.randn(4, k, m, requires_grad=True)
    sizes = torch.tensor([3, 0, 7, 0])
    probe = torch.randn(10, m)
    want = torch.cat([a[:3] @ b[0], a[3:] @ b[2]])
    want_grads = torch.autograd.grad((want * probe).sum(), [a, b])
    for form in (grouped_mm, grouped_mm_loop):
        got = form(a, b, sizes)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad((got * probe).sum(), [a, b]), want_grads)


def test_padding_tokens_get_no_expert_output():
    moe = _moe()
    x, bb_token, bb_hidden, mask = _inputs(moe)
    out = moe(x, bb_token, bb_hidden, mask)
    assert (out[1, 3:] == 0).all() and (out[0] != 0).any()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stacked_fake_quantization_equals_each_experts_own(bits):
    moe = _moe(expert_bits=bits)
    w1, _, w2, _ = expert_stack(moe.experts)
    own1 = [straight_through(e.fc1.weight, bits, e.fc1.group_size) for e in moe.experts]
    own2 = [straight_through(e.fc2.weight, bits, e.fc2.group_size) for e in moe.experts]
    assert torch.equal(w1, torch.stack(own1)) and torch.equal(w2, torch.stack(own2))


def test_packed_experts_run_batched_as_their_own_forward():
    model = tiny_model(expert_bits=4)
    model.pack_experts()
    moe = model.side.moe_layers()[0].eval()
    inputs = [t.detach() for t in _inputs(moe)]
    torch.testing.assert_close(moe(*inputs), _loop(moe, *inputs), atol=1e-6, rtol=1e-5)


def test_balance_and_z_losses_are_those_of_the_forwards_router_logits():
    moe = _moe()
    x, bb_token, bb_hidden, mask = _inputs(moe)
    moe(x, bb_token, bb_hidden, mask)
    weights, logits = moe.router(x, bb_token, bb_hidden, mask)
    torch.testing.assert_close(moe.aux_loss, load_balance_loss(logits, weights, mask))
    torch.testing.assert_close(moe.z_loss, z_loss(logits, mask))
