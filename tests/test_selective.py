"""fxshear.block_selective (BSR): the kept and fused tokens follow the published rule, padding is
never kept over a real token, nothing is saved below the lowest trained block, one compiled graph
over changing batches, and compiled gradients equal eager ones of the same dropping."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxshear
from fxshear.config import ConfigError
from fxshear.selective import selective_state
from fxshear.selective.tokens import cls_attention, keep_tokens, kept_count, key_valid, mask_like
from fxshear.zoo.models import build_model


@pytest.fixture(scope="module")
def examples() -> dict:
    return {"vit": build_model("vit", dropout=False),
            "minilm": build_model("minilm", dropout=False, pooling="cls"),
            "llama": build_model("llama", dropout=False)}


def _copy(example, **options) -> nn.Module:
    return fxshear.block_selective(copy.deepcopy(example.model), **options)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(example, model: nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    loss = example.loss(model, batch)
    loss.backward()
    return float(loss.detach()), _grads(model)


# --- the published rule, written plainly --------------------------------------------------------

def _reference_keep(x: torch.Tensor, wq: nn.Linear, wk: nn.Linear, heads: int, keep_rate: float,
                    valid: torch.Tensor | None, summary: int = 1) -> tuple[torch.Tensor, list[list[int]]]:
    """EViT/BSR: the full attention matrix, row 0, averaged over heads; keep the summary tokens,
    the top ceil(r (N - summary)) others, and the attention-weighted sum of the rest."""
    batch, tokens, dim = x.shape
    q = wq(x).view(batch, tokens, heads, -1).transpose(1, 2)
    k = wk(x).view(batch, tokens, heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim // heads)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    attn = scores.softmax(-1)[:, :, 0, summary:].mean(1)                 # [B, N - summary]
    keep = math.ceil(keep_rate * (tokens - summary))
    rows, kept = [], []
    for b in range(batch):
        order = sorted(range(tokens - summary), key=lambda i: -float(attn[b, i]))[:keep]
        body = x[b, summary:]
        dropped = [i for i in range(tokens - summary) if i not in order]
        fused = sum((attn[b, i] * body[i] for i in dropped), torch.zeros(dim))
        rows.append(torch.cat([x[b, :summary], body[order], fused[None]]))
        kept.append(order)
    return torch.stack(rows), kept


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(3, 40), keep_rate=st.floats(0.05, 1.0), padded=st.booleans(),
       summary=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_kept_and_fused_tokens_equal_the_published_rule(tokens, keep_rate, padded, summary, seed) -> None:
    if tokens <= summary:
        return
    gen = torch.Generator().manual_seed(seed)
    batch, dim, heads = 3, 16, 2
    torch.manual_seed(seed)
    wq, wk = nn.Linear(dim, dim), nn.Linear(dim, dim)
    x = torch.randn(batch, tokens, dim, generator=gen)
    valid = None
    if padded:
        lengths = torch.randint(summary + 1, tokens + 1, (batch,), generator=gen)
        valid = torch.arange(tokens)[None] < lengths[:, None]
    keep = kept_count(keep_rate, tokens, summary)
    with torch.no_grad():
        attn = cls_attention(wq, wk, x, heads, valid, summary)
        ours, kept_valid = keep_tokens(x, attn, keep, True, summary, valid)
        reference, reference_kept = _reference_keep(x, wq, wk, heads, keep_rate, valid, summary)
    assert ours.shape == (batch, summary + keep + 1, dim)
    # the fused token is last in both; padding gets no attention, so it adds nothing to it
    torch.testing.assert_close(ours[:, -1], reference[:, -1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[:, :summary], reference[:, :summary])
    for b in range(batch):
        # the same real tokens kept (as a set: their order is not part of the rule; which of
        # several equally unattended padding tokens fills a slot is not either)
        real = [True] * keep if valid is None else valid[b, summary:][reference_kept[b]].tolist()
        ours_real = [True] * keep if valid is None else kept_valid[b, summary:summary + keep].tolist()
        a = ours[b, summary:summary + keep][torch.tensor(ours_real)].sort(dim=0).values
        r = reference[b, summary:summary + keep][torch.tensor(real)].sort(dim=0).values
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    if valid is not None:
        real = valid[:, summary:].sum(1)
        for b in range(batch):
            kept_real = int(kept_valid[b, summary:summary + keep].sum())
            assert kept_real == min(keep, int(real[b])), "a padding token was kept over a real one"


def test_masks_of_every_form_follow_the_kept_tokens() -> None:
    valid = torch.tensor([[True, True, False], [True, False, False]])
    additive = torch.where(valid[:, None, None, :], 0.0, torch.finfo(torch.float32).min)
    square = additive.expand(2, 1, 3, 3)
    for mask in (valid.long(), valid, additive, square, valid[:, None, None, :]):
        assert torch.equal(key_valid(mask, 3), valid)
    kept = torch.tensor([[True, False], [True, True]])
    assert torch.equal(mask_like(valid.long(), kept), kept.long())
    assert torch.equal(key_valid(mask_like(square, kept), 2), kept)
    assert mask_like(square, kept).shape == (2, 1, 1, 2)  # broadcast, not N x N
    assert mask_like(None, kept) is None


# --- whole models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit", "minilm"])
def test_keep_rate_one_with_every_block_trained_is_the_original_model(examples, name) -> None:
    example = examples[name]
    batch = example.make_batch(2, 12, seed=0)
    count = len(_copy(example).__dict__["_fxshear_selective_state"].train_blocks)
    plain_loss, plain = _step(example, copy.deepcopy(example.model), batch)
    loss, grads = _step(example, _copy(example, drop_at=list(range(count)), keep_rate=1.0), batch)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(grads[key], plain[key], rtol=1e-5, atol=1e-7)


def test_only_the_trained_blocks_and_the_head_train(examples) -> None:
    model = _copy(examples["vit"], train_blocks=[1], drop_at=[0])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("vit.layers.1.", "vit.layernorm.", "classifier.")) for n in trainable)
    assert "classifier.weight" in trainable and "vit.layernorm.weight" in trainable
    frozen_head = _copy(examples["vit"], train_blocks=[1], train_head=False)
    assert all(n.startswith("vit.layers.1.") for n, p in frozen_head.named_parameters() if p.requires_grad)


def test_token_counts_are_the_shapes_the_blocks_see(examples) -> None:
    example = examples["minilm"]
    model = _copy(example, train_blocks=[4, 5], drop_at=[1, 3], keep_rate=0.5)
    seen: dict[int, int] = {}
    for i, block in enumerate(model.encoder.encoder.layer):
        block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].shape[1]))
    example.loss(model, example.make_batch(2, 21, seed=0))
    counts = selective_state(model).token_counts(21)
    assert counts == [(1, 21, 1 + 10 + 1), (3, 12, 1 + 6 + 1)]
    assert [seen[i] for i in range(6)] == [21, 21, 12, 12, 8, 8]


def test_deit_keeps_the_cls_and_distillation_tokens() -> None:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher
    config = DeiTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = DeiTForImageClassificationWithTeacher(config).eval()
    fxshear.block_selective(model, train_blocks=[1], drop_at=[0], keep_rate=0.5, fuse_dropped=False)
    assert selective_state(model).summary == 2
    captured = {}
    model.deit.layers[0].register_forward_hook(lambda m, a, out: captured.update(inp=a[0], out=out))
    model(pixel_values=torch.randn(2, 3, 32, 32))
    inp, out = captured["inp"], captured["out"]
    assert out.shape[1] == 2 + math.ceil(0.5 * 16)
    block = model.deit.layers[0]
    with torch.no_grad():  # the two summary tokens went through the block untouched by dropping
        h = block.attention(block.layernorm_before(inp))[0] + inp
        expected = block.mlp(block.layernorm_after(h[:, :2])) + h[:, :2]
    torch.testing.assert_close(out[:, :2], expected)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_padding_rows_give_the_unpadded_rows_answer(examples, attention) -> None:
    """A row whose real tokens all fit in the kept count keeps all of them (padding ranks last),
    the fused token of dropped padding is masked, so the CLS logits equal the unconverted model's
    on the same row without padding (attention is order-free once positions are embedded)."""
    example = examples["minilm"] if attention == "eager" else build_model(
        "minilm", dropout=False, pooling="cls", attn_implementation=attention)
    model = _copy(example, train_blocks=[5], drop_at=[0, 2], keep_rate=0.5).eval()
    plain = copy.deepcopy(example.model).eval()
    ids = torch.randint(1000, 20000, (1, 24), generator=torch.Generator().manual_seed(3))
    ids[0, 0] = 101
    mask = torch.zeros(1, 24, dtype=torch.long)
    mask[0, :6] = 1  # 6 real tokens; block 0 keeps ceil(0.5 * 23) = 12, block 2 keeps 7 of 13
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask)
        reference = plain(input_ids=ids[:, :6], attention_mask=mask[:, :6])
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_block_selection_alone_works_on_a_decoder(examples) -> None:
    example = examples["llama"]
    model = _copy(example, train_blocks=[1])
    loss, grads = _step(example, model, example.make_batch(2, 16, seed=0))
    assert math.isfinite(loss)
    assert grads and not any(".layers.0." in n or "embed" in n for n in grads)


# --- compiled -------------------------------------------------------------------------------------

def _compiled_run(example, model: nn.Module, seeds: range, length: int = 16):
    backend = fxshear.ShearBackend(fxshear.ShearConfig.from_options(preset="exact"))
    compiled = torch.compile(model, backend=backend)
    results = []
    for seed in seeds:
        model.zero_grad(set_to_none=True)
        loss = example.loss(compiled, example.make_batch(4, length, seed=seed))
        loss.backward()
        results.append((float(loss.detach()), _grads(model)))
    return backend, results


@pytest.mark.parametrize("name, options", [
    ("vit", dict(train_blocks=[1], drop_at=[0], keep_rate=0.5)),
    ("minilm", dict(train_blocks=[3, 5], drop_at=[1, 3], keep_rate=0.5)),
])
def test_compiled_gradients_equal_eager_and_one_graph_serves_every_batch(examples, name, options) -> None:
    example = examples[name]
    eager = _copy(example, **options)
    model = _copy(example, **options)
    torch._dynamo.reset()
    backend, compiled = _compiled_run(example, model, range(3))
    assert len(backend.regions) == 1, "a recompile or a graph break"
    for seed, (loss, grads) in zip(range(3), compiled):
        eager.zero_grad(set_to_none=True)
        eager_loss, eager_grads = _step(example, eager, example.make_batch(4, 16, seed=seed))
        assert loss == pytest.approx(eager_loss, rel=1e-5)
        assert grads.keys() == eager_grads.keys()
        for key in grads:
            torch.testing.assert_close(grads[key], eager_grads[key], rtol=1e-4, atol=1e-6)

    # nothing below the lowest trained block is saved, except (MiniLM) the kept tokens' mask the
    # trained blocks' attention reads: [B, 1, 1, N_kept]
    lowest = options["train_blocks"][0]
    entries = backend.regions[0].ledger.entries
    below = [e for e in entries if e.kind != "parameter" and _block_index(e.module) is not None
             and _block_index(e.module) < lowest]
    for entry in below:
        assert entry.bytes <= 4 * 4 * 16, (entry.module, entry.op, entry.bytes)
    assert not [e for e in entries if e.kind != "parameter" and "embed" in (e.module or "")]


def _block_index(module: str | None) -> int | None:
    import re
    match = re.search(r"\.(?:layer|layers)\.(\d+)(?:\.|$)", module or "")
    return int(match.group(1)) if match else None


def test_train_step_freezing_acts_inside_the_trained_blocks_only(examples) -> None:
    example = examples["vit"]
    model = _copy(example, train_blocks=[1], drop_at=[0])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    @fxshear.train_step(model, freeze="bandit", sparsity=0.5, compile=False, optimizer=optimizer)
    def step(batch):
        loss = example.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    step(example.make_batch(2, 0, seed=0))
    arms = [arm.name for arm in step.arms]
    assert arms and all(name.startswith("vit.layers.1.") for name in arms)


# --- configuration errors -------------------------------------------------------------------------

@pytest.mark.parametrize("options, field", [
    (dict(train_blocks=[6]), "train_blocks"),
    (dict(train_blocks=[-1]), "train_blocks"),
    (dict(train_blocks=[]), "train_blocks"),
    (dict(train_blocks=3), "train_blocks"),
    (dict(drop_at=[9]), "drop_at"),
    (dict(keep_rate=0.0), "keep_rate"),
    (dict(keep_rate=1.5), "keep_rate"),
    (dict(keep_rate=True), "keep_rate"),
    (dict(blocks="encoder.embeddings"), "blocks"),
])
def test_bad_options_name_the_field(examples, options, field) -> None:
    with pytest.raises(ConfigError, match=field):
        _copy(examples["minilm"], **options)


def test_a_drop_site_left_with_no_token_to_rank_is_an_error_naming_drop_at(examples) -> None:
    example = examples["minilm"]
    model = _copy(example, train_blocks=[5], drop_at=[0])
    with pytest.raises(ConfigError, match="drop_at"):
        example.loss(model, {"input_ids": torch.tensor([[101]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
                             "labels": torch.tensor([0])})


def test_token_dropping_on_a_causal_lm_says_why_not(examples) -> None:
    with pytest.raises(ConfigError, match="causal LM has none"):
        _copy(examples["llama"], train_blocks=[1], drop_at=[0])


def test_converting_twice_or_a_model_without_blocks_is_an_error(examples) -> None:
    model = _copy(examples["vit"], train_blocks=[1])
    with pytest.raises(ConfigError, match="already block-selective"):
        fxshear.block_selective(model, train_blocks=[1])
    with pytest.raises(ConfigError, match="blocks="):
        fxshear.block_selective(nn.Sequential(nn.Linear(2, 2)))


def test_mean_pooling_after_token_dropping_names_the_fix() -> None:
    example = build_model("minilm", dropout=False)
    model = fxshear.block_selective(example.model, train_blocks=[5], drop_at=[0])
    with pytest.raises(ValueError, match="pooling='cls'"):
        example.loss(model, example.make_batch(2, 12))
