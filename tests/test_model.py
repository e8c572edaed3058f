"""MP-ISMoE model: frozen low-bit backbone (METL), ladder side network, interactive ISMoE."""

import pytest
import torch
from conftest import random_batch as _batch
from conftest import tiny_model

from mpismoe_edge.model import load_checkpoint, read_checkpoint, save_checkpoint
from mpismoe_edge.quant import QuantLinear
from mpismoe_edge.side.router import load_balance_loss, salient_summary


def test_backbone_parameters_get_no_gradient():
    model = tiny_model().train()
    ids, mask = _batch()
    (model(ids, mask).sum() + model.aux_loss()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert any(p.grad is not None for p in model.side.parameters())


def test_backward_never_enters_the_backbone():
    model = tiny_model().train()
    entered = []
    for module in model.backbone.modules():
        if not list(module.children()):  # leaves return tensors, so their hooks would fire
            module.register_full_backward_hook(lambda *a: entered.append(1))
    ids, mask = _batch()
    model(ids, mask).sum().backward()
    assert entered == []


def test_backbone_linears_are_quantized_to_the_configured_bits():
    model = tiny_model(bits=3)
    qlinears = [m for m in model.backbone.modules() if isinstance(m, QuantLinear)]
    assert qlinears and all(m.bits == 3 for m in qlinears)
    assert not any(type(m) is torch.nn.Linear for m in model.backbone.modules())


def test_backbone_stays_in_eval_mode_when_training():
    model = tiny_model().train()
    assert model.side.training and not model.backbone.training


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "vit"])
def test_supported_backbone_families_produce_logits(kind):
    model = tiny_model(kind).eval()
    if kind == "vit":
        out = model(pixel_values=torch.randn(2, 1, 16, 16))
    else:
        ids, mask = _batch(2, 6)
        out = model(**dict(zip(["input_ids", "attention_mask"], (ids, mask))))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_padding_does_not_change_logits():
    model = tiny_model().eval()
    ids, _ = _batch(1, 5)
    alone = model(ids, torch.ones_like(ids))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, mask), alone, atol=1e-5, rtol=1e-5)


def test_router_depends_on_backbone_features():
    model = tiny_model().eval()
    router = model.side.moe_layers()[0].router
    x = torch.randn(1, 5, 16)
    bb_token, bb = torch.randn(1, 5, 16), torch.randn(1, 5, 64)
    w1, _ = router(x, bb_token, bb, None)
    w2, _ = router(x, bb_token * 5, bb * 5, None)
    assert not torch.allclose(w1, w2)


def test_router_logits_are_the_gate_over_side_token_backbone_token_and_salient_summary():
    from mpismoe_edge.side.router import InteractiveRouter, salient_summary

    router = InteractiveRouter(16, 64, num_experts=8, top_k=2, salient_tau=0.1)
    x, bb_token, bb, mask = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 64), torch.ones(2, 5)
    summary = router.salient_proj(salient_summary(bb, mask, 0.1)).unsqueeze(1).expand_as(x)
    expected = router.gate(torch.cat([x, bb_token, summary], -1))
    torch.testing.assert_close(router.logits(x, bb_token, bb, mask), expected)


def test_routing_picks_top_k_experts_with_weights_summing_to_one():
    model = tiny_model().eval()
    moe = model.side.moe_layers()[0]
    w, _ = moe.router(torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 64), None)
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))


def test_router_noise_changes_the_choice_in_training_only():
    from mpismoe_edge.side.router import InteractiveRouter

    router = InteractiveRouter(16, 64, num_experts=8, top_k=2, salient_tau=0.1, noise=10.0)
    feats = (torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 64), None)
    torch.testing.assert_close(router.eval()(*feats)[0], router(*feats)[0])
    torch.manual_seed(0)
    noisy, logits = router.train()(*feats)
    assert ((noisy > 0).sum(-1) == 2).all()
    assert not torch.equal(noisy > 0, router.eval()(*feats)[0] > 0)
    torch.testing.assert_close(logits, router.eval()(*feats)[1])  # the balance losses read the raw logits


def test_salient_summary_favours_distinctive_unmasked_tokens():
    hidden = torch.zeros(1, 5, 2)
    hidden[0, :3] = torch.tensor([1.0, 0.0])  # three alike tokens
    hidden[0, 3] = torch.tensor([0.0, 4.0])  # the distinctive one
    hidden[0, 4] = torch.tensor([9.0, 9.0])  # even more distinctive, but masked
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    summary = salient_summary(hidden, mask, tau=0.1)
    torch.testing.assert_close(summary, torch.tensor([[0.0, 4.0]]), atol=1e-3, rtol=0)


def test_salient_summary_ignores_padding():
    hidden = torch.randn(1, 4, 8)
    padded = torch.cat([hidden, torch.randn(1, 3, 8) * 100], 1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(salient_summary(padded, mask, 0.1), salient_summary(hidden, None, 0.1))


def test_salient_summary_is_the_softmax_over_distances_from_the_mean_pool():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16) * 2 + 1
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    keep = mask.float().unsqueeze(-1)
    mean = (hidden * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
    score = ((hidden - mean).norm(dim=-1) / (4 * 0.5)).masked_fill(mask == 0, float("-inf"))
    expected = (score.softmax(-1).unsqueeze(-1) * hidden).sum(1)
    torch.testing.assert_close(salient_summary(hidden, mask, 0.5), expected, atol=1e-5, rtol=1e-5)


def test_salient_summary_under_bf16_autocast_stays_close_to_float32():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 64) * 3 + 5  # far from the origin: ||h||^2 - 2 h.m + ||m||^2 would cancel
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = salient_summary(hidden, mask, 0.1)
    torch.testing.assert_close(low.float(), salient_summary(hidden, mask, 0.1), atol=0.1, rtol=0.02)


def test_load_balance_loss_is_one_when_perfectly_balanced():
    logits = torch.zeros(4, 4)
    weights = torch.eye(4)
    assert load_balance_loss(logits, weights, None).item() == pytest.approx(1.0)


def test_shared_expert_adds_parameters():
    plain = sum(p.numel() for p in tiny_model().side.parameters())
    shared = sum(p.numel() for p in tiny_model(shared_expert=True).side.parameters())
    assert shared > plain


def test_expert_load_counts_each_real_token_top_k_times():
    model = tiny_model().train()
    ids, mask = _batch()
    model(ids, mask)
    load = model.expert_load()
    assert load.shape == (2, 4)
    assert (load.sum(-1) == 2 * mask.sum()).all()


def test_packed_experts_compute_what_quantization_aware_training_computed():
    model = tiny_model(bits=None).eval()  # a float backbone: its quantizer (RTN here) plays no part
    ids, mask = _batch()
    before = model(ids, mask)
    model.pack_experts()
    experts = model.side.moe_layers()[0].experts
    assert all(isinstance(e.fc1, QuantLinear) and e.fc1.bits == 4 for e in experts)
    torch.testing.assert_close(model(ids, mask), before, atol=1e-5, rtol=1e-5)


def test_packed_experts_have_integer_zero_points():
    model = tiny_model(bits=None).eval()
    model.pack_experts()
    zeros = torch.cat([e.fc1.zeros.flatten() for e in model.side.moe_layers()[0].experts])
    assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = tiny_model().eval()
    model.pack_experts()
    ids, mask = _batch()
    save_checkpoint(model, tmp_path / "model.pt")
    torch.load(tmp_path / "model.pt", weights_only=True)
    again = load_checkpoint(tmp_path / "model.pt")
    torch.testing.assert_close(again(ids, mask), model(ids, mask))
    assert again.tokenizer_json == model.tokenizer_json


def test_checkpoint_refuses_a_pickle_with_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="not an mpismoe-edge checkpoint"):
        read_checkpoint(path)


def test_truncated_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not an mpismoe-edge checkpoint"):
        read_checkpoint(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model().eval()
    path = tmp_path / "model.pt"
    save_checkpoint(model, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_checkpoint(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_backbone_without_hidden_states_is_refused():
    from mpismoe_edge.config import ModelConfig, SideConfig
    from mpismoe_edge.model import build_model

    class NoStates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"hidden_size": 64, "num_hidden_layers": 1, "to_dict": lambda self: {}})()
            self.lin = torch.nn.Linear(64, 64)

        def forward(self, input_ids=None, attention_mask=None, **kw):
            return type("O", (), {"hidden_states": None})()

    with pytest.raises(ValueError, match="no hidden_states"):
        build_model(NoStates(), ModelConfig(labels=["a", "b"], side=SideConfig(expert_bits=None), quant=None))


def test_expert_fake_quantization_uses_the_rtn_grid():
    from mpismoe_edge.quant import rtn_quantize
    from mpismoe_edge.side.experts import fake_quantize

    w = torch.randn(32, 48)
    torch.testing.assert_close(fake_quantize(w, 3, 16), rtn_quantize(w, 3, 16).dequantize())


@pytest.mark.parametrize("expert_bits,pack", [(None, False), (4, True)])
def test_stacked_experts_equal_the_dense_mixture(expert_bits, pack):
    """The export form (all experts as one wide FFN) computes the same mixture."""
    model = tiny_model(expert_bits=expert_bits)
    if pack:
        model.pack_experts()
    moe = model.side.moe_layers()[0]
    moe.prepare_export()
    x = torch.randn(2, 5, 16)
    weights, _ = moe.router(x, torch.randn(2, 5, 16), torch.randn(2, 5, 64), None)
    dense = sum(weights[..., e : e + 1] * expert(x) for e, expert in enumerate(moe.experts))
    torch.testing.assert_close(moe._stacked_mixture(x, weights), dense)


def test_experts_in_quantization_aware_training_are_not_stacked():
    moe = tiny_model(expert_bits=4).side.moe_layers()[0]
    moe.prepare_export()
    assert moe._stack is None and not any(n.startswith("stacked_") for n, _ in moe.named_buffers())


def test_checkpoint_of_a_backbone_without_pooler_loads(tmp_path):
    from conftest import tiny_backbone, tiny_tokenizer

    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
    from mpismoe_edge.model import build_model

    backbone = tiny_backbone()
    backbone.pooler = None  # what BertModel(add_pooling_layer=False) builds
    config = ModelConfig(
        labels=["a", "b"],
        side=SideConfig(reduction=4, num_heads=2, num_experts=2, expert_bits=None),
        quant=QuantConfig(group_size=32, method="rtn"),
    )
    model = build_model(backbone, config, tiny_tokenizer().to_str(), progress=False).eval()
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=torch.ones_like(ids)),
        model(input_ids=ids, attention_mask=torch.ones_like(ids)),
    )


def test_token_classification_gives_logits_per_token():
    model = tiny_model(task="token-classification", labels=("O", "B-X", "I-X")).eval()
    ids, mask = _batch(2, 6)
    assert model(ids, mask).shape == (2, 6, 3)


def test_token_logits_do_not_depend_on_padding():
    model = tiny_model(task="token-classification", labels=("O", "B-X", "I-X")).eval()
    ids, _ = _batch(1, 5)
    alone = model(ids, torch.ones_like(ids))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, mask)[:, :5], alone, atol=1e-5, rtol=1e-5)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="ModelConfig.task must be one of .*, got 'ner'"):
        tiny_model(task="ner")
