"""Back Razor pruning: per-sample top-k semantics, pruned weight gradients against a hand-pruned
input, exact input gradients, opcheck, static shapes under torch.compile, the pass and the ledger."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxshear
from fxshear.config import ShearConfig
from fxshear.kernels.infra.lowering import lowerable_ops
from helpers import opaque_fxshear_ops
from fxshear.kernels.prune import (
    _lower_prune_pack,
    _lower_pruned_weight_grad,
    keep_count,
    prune_pack,
    pruned_linear,
    pruned_weight_grad,
    unpack_rows,
    unprune_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def hand_pruned(x: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """x with all but each sample's top-k magnitudes zeroed, by torch.topk (inputs without ties)."""
    rows = x.reshape(x.shape[0], -1)
    k = keep_count(rows.shape[1], keep_ratio)
    kept = rows.abs().float().topk(k, dim=1).indices
    mask = torch.zeros_like(rows, dtype=torch.bool).scatter(1, kept, True)
    return torch.where(mask, rows, torch.zeros_like(rows)).view(x.shape)


def distinct_randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Random values with distinct magnitudes in ``dtype`` (no ties for top-k)."""
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for size in shape:
        numel *= size
    magnitudes = (torch.randperm(numel, generator=generator).float() + 1) / numel * 4
    signs = torch.where(torch.rand(numel, generator=generator) < 0.5, -1.0, 1.0)
    values = (magnitudes * signs).view(shape).to(dtype)
    assert values.abs().reshape(-1).unique().numel() == numel or dtype != torch.float32
    return values


def test_keep_count() -> None:
    assert keep_count(10, 0.1) == 1  # not 2: 0.1 * 10 is 1.0000000000000002 in floats
    assert keep_count(196608, 0.1) == 19661
    assert keep_count(7, 0.5) == 4
    assert keep_count(5, 1e-6) == 1  # at least one entry per sample
    assert keep_count(5, 1.0) == 5
    assert keep_count(0, 0.3) == 0
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_count(10, 0.0)


@pytest.mark.parametrize("keep_ratio", [0.5, 0.2, 0.1, 0.05])
def test_per_sample_top_k(keep_ratio: float) -> None:
    x = distinct_randn(4, 6, 10)
    values, bits = prune_pack(x, keep_ratio, "torch")
    k = keep_count(60, keep_ratio)
    assert values.shape == (4, k) and values.dtype == x.dtype
    assert bits.shape == (4, 8) and bits.dtype == torch.uint8  # ceil(60 / 8) bytes per sample
    mask = unpack_rows(bits, 60)
    rows = x.reshape(4, 60)
    for sample in range(4):
        kept, dropped = rows[sample][mask[sample]], rows[sample][~mask[sample]]
        assert kept.numel() == k
        assert kept.abs().min() > dropped.abs().max()  # the largest magnitudes of this sample
        assert torch.equal(values[sample], kept)  # in row-major order
    assert torch.equal(unprune_reference(values, bits, 60).view(x.shape), hand_pruned(x, keep_ratio))


def test_samples_are_pruned_independently() -> None:
    """A sample of small values keeps its own top-k, however large the other samples are."""
    x = torch.cat([distinct_randn(1, 20, seed=1) * 1000, distinct_randn(1, 20, seed=2) * 1e-3])
    values, bits = prune_pack(x, 0.25, "torch")
    assert unpack_rows(bits, 20).sum(dim=1).tolist() == [5, 5]
    assert values[1].abs().max() < 1


def test_ties_are_kept_in_index_order_and_nan_counts_as_largest() -> None:
    x = torch.tensor([[1.0, -2.0, 2.0, 2.0, 0.5, -2.0]])
    values, bits = prune_pack(x, 0.5, "torch")  # k = 3 of four tied magnitudes 2
    assert values.tolist() == [[-2.0, 2.0, 2.0]]
    assert unpack_rows(bits, 6).tolist() == [[False, True, True, True, False, False]]
    y = torch.tensor([[0.1, float("nan"), 5.0, -0.2]])
    values, _ = prune_pack(y, 0.5, "torch")
    assert values[0, 0].isnan() and values[0, 1] == 5.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_ratio_one_gives_the_unpruned_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 7, 12, dtype=dtype, requires_grad=True)
    weight = torch.randn(5, 12, dtype=dtype, requires_grad=True)
    bias = torch.randn(5, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 7, 5, dtype=dtype)
    expected = torch.autograd.grad(F.linear(x, weight, bias), (x, weight, bias), grad)
    values, bits = prune_pack(x, 1.0, "torch")
    assert values.shape == (3, 84)
    out = pruned_linear(x, values, bits, weight, bias, "torch")
    assert torch.equal(out, F.linear(x, weight, bias))
    actual = torch.autograd.grad(out, (x, weight, bias), grad)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("keep_ratio", [0.5, 0.1])
def test_weight_gradient_is_grad_times_hand_pruned_input(keep_ratio: float) -> None:
    x = distinct_randn(4, 9, 16).requires_grad_()
    torch.manual_seed(1)
    weight = torch.randn(6, 16, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    grad = torch.randn(4, 9, 6)
    values, bits = prune_pack(x, keep_ratio, "torch")
    out = pruned_linear(x, values, bits, weight, bias, "torch")
    dx, dw, db = torch.autograd.grad(out, (x, weight, bias), grad)
    pruned = hand_pruned(x.detach(), keep_ratio)
    torch.testing.assert_close(dw, grad.reshape(-1, 6).t() @ pruned.reshape(-1, 16), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, grad @ weight.detach(), rtol=0, atol=0)  # the input gradient is exact
    torch.testing.assert_close(db, grad.sum((0, 1)), rtol=1e-6, atol=1e-6)


def test_only_the_packed_input_is_saved() -> None:
    x = torch.randn(8, 32, 64, requires_grad=True)
    weight = torch.randn(16, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    values, bits = prune_pack(x, 0.1, "torch")
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = pruned_linear(x, values, bits, weight, None, "torch")
    assert sorted(tuple(t.shape) for t in saved) == sorted([(8, 205), (8, 256), (16, 64)])
    dense_bytes = x.numel() * 4
    packed_bytes = values.numel() * 4 + bits.numel()
    assert packed_bytes < 0.14 * dense_bytes  # 0.1 of the values + 1 bit per element
    out.sum().backward()


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 11), min_size=2, max_size=4).map(tuple),
       keep_ratio=st.sampled_from([1.0, 0.5, 0.3, 0.1, 0.01]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_pack_invariants_over_shapes_and_dtypes(shape: tuple[int, ...], keep_ratio: float, dtype: torch.dtype,
                                                seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(dtype)
    samples = shape[0]
    n = x.numel() // samples
    k = keep_count(n, keep_ratio)
    values, bits = prune_pack(x, keep_ratio, "torch")
    assert values.shape == (samples, k) and bits.shape == (samples, (n + 7) // 8)
    mask = unpack_rows(bits, n)
    assert mask.sum(dim=1).tolist() == [k] * samples
    rows = x.reshape(samples, n)
    for sample in range(samples):
        kept, dropped = rows[sample][mask[sample]], rows[sample][~mask[sample]]
        if dropped.numel():
            assert kept.abs().min() >= dropped.abs().max()
        assert torch.equal(values[sample], kept)
    if n % 8:
        assert (bits[:, -1] >> (n % 8)).eq(0).all()  # pad bits are zero
    dense = unprune_reference(values, bits, n)
    assert torch.equal(dense, torch.where(mask, rows, torch.zeros_like(rows)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype: torch.dtype) -> None:
    x = torch.randn(3, 5, 8, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    bias = torch.randn(4, dtype=dtype, requires_grad=True)
    torch.library.opcheck(prune_pack, (x, 0.3, "torch"))
    values, bits = prune_pack(x.detach(), 0.3, "torch")
    torch.library.opcheck(pruned_linear, (x, values, bits, weight, bias, "torch"))
    torch.library.opcheck(pruned_linear, (x, values, bits, weight, None, "torch"))
    grad = torch.randn(3, 5, 4, dtype=dtype)
    torch.library.opcheck(pruned_weight_grad, (grad, values, bits, 8, "torch"))


def test_bad_arguments_are_clear() -> None:
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="keep_ratio"):
        prune_pack(x, 1.5, "torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        prune_pack(x, 0.5, "cuda")
    values, bits = prune_pack(x, 0.5, "torch")
    with pytest.raises(ValueError, match="bits must be"):
        pruned_linear(x, values, bits[:, :0], torch.randn(3, 6), None, "torch")
    with pytest.raises(ValueError, match="values must be"):
        pruned_linear(x, values[:1], bits, torch.randn(3, 6), None, "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowerings_trace_to_the_ops(dtype: torch.dtype) -> None:
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    assert torch.ops.fxshear.prune_pack.default in lowerable_ops()
    assert torch.ops.fxshear.pruned_weight_grad.default in lowerable_ops()
    x = torch.randn(4, 6, 9).to(dtype)
    traced = make_fx(lambda t: _lower_prune_pack(t, 0.2, "auto"), decomposition_table=select_decomp_table())(x)
    assert not opaque_fxshear_ops(traced.graph)
    for a, e in zip(traced(x), prune_pack(x, 0.2, "torch")):
        assert torch.equal(a, e)
    values, bits = prune_pack(x, 0.2, "torch")
    grad = torch.randn(4, 6, 5).to(dtype)
    traced = make_fx(lambda g, v, b: _lower_pruned_weight_grad(g, v, b, 9, "auto"),
                     decomposition_table=select_decomp_table())(grad, values, bits)
    assert torch.equal(traced(grad, values, bits), pruned_weight_grad(grad, values, bits, 9, "torch"))


# ---------------------------------------------------------------------------------------------
# The pass, under torch.compile
# ---------------------------------------------------------------------------------------------


class Block(torch.nn.Module):
    """fc1 -> GELU -> fc2 -> head: fc2 reads the GELU output, which (with 2-bit codes) nothing else keeps."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(width, 4 * width)
        self.fc2 = torch.nn.Linear(4 * width, width)
        self.classifier = torch.nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc2(F.gelu(self.fc1(x))))


def _backend(**options: object) -> fxshear.ShearBackend:
    return fxshear.ShearBackend(ShearConfig.from_options(preset="aggressive", **options), codegen=False)


def _rewritten(backend: fxshear.ShearBackend) -> dict[str, list[str]]:
    return {r.name: r.rewritten for region in backend.regions for r in region.pass_reports}


def _skipped(backend: fxshear.ShearBackend) -> list[str]:
    return [s.reason for region in backend.regions for r in region.pass_reports if r.name == "prune"
            for s in r.skipped]


def test_pass_prunes_what_only_a_weight_gradient_keeps() -> None:
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(4, 10, 32)
    backend = _backend()
    torch.compile(model, backend=backend)(x).sum().backward()
    rewritten = _rewritten(backend)["prune"]
    # fc2 reads the GELU output (2-bit codes: kept only for fc2's weight gradient); fc1 reads the
    # graph input; the classifier is excluded by default.
    assert [r.split(" for ")[1] for r in rewritten] == ["1 linear: fc1", "1 linear: fc2"], rewritten
    assert any("excluded from pruning" in reason for reason in _skipped(backend))
    entries = [e for region in backend.regions for e in region.ledger.entries if e.kind == "activation"]
    packed = [e for e in entries if e.introduced_by == "prune"]
    assert {e.dtype for e in packed} == {"float32", "uint8"}, packed  # values and bits in the ledger
    dense_fc2_input = [e for e in entries if tuple(e.shape) == (4, 10, 128) and e.dtype == "float32"]
    assert not dense_fc2_input, dense_fc2_input


def test_pruned_model_gradients_match_the_hand_pruned_reference() -> None:
    """Compiled with pruning only, fc2's weight gradient is gᵀ·prune(h) and every other gradient is exact."""  # noqa: RUF002
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(4, 10, 32)
    out = model(x)
    out.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    h = F.gelu(model.fc1(x)).detach()
    grad_fc2_out = torch.ones(4, 10, 3) @ model.classifier.weight.detach()
    expected["fc2.weight"] = grad_fc2_out.reshape(-1, 32).t() @ hand_pruned(h, 0.25).reshape(-1, 128)
    model.zero_grad(set_to_none=True)
    # fc1 kept dense through a per-module ratio of 1.0, so only fc2's weight gradient changes.
    backend = fxshear.ShearBackend(ShearConfig.from_options(preset="none", prune=True, keep_ratio=0.25,
                                                            keep_ratios={"fc1": 1.0}), codegen=False)
    torch.compile(model, backend=backend)(x).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_frozen_linear_and_a_dense_kept_input_are_left_alone() -> None:
    torch.manual_seed(0)

    class Softmaxed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)
            self.frozen = torch.nn.Linear(16, 16).requires_grad_(False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(torch.softmax(x, -1)) + self.frozen(x)

    backend = _backend()
    x = torch.randn(2, 5, 16, requires_grad=True)
    torch.compile(Softmaxed(), backend=backend)(x).sum().backward()
    reasons = _skipped(backend)
    assert any("frozen weight" in r for r in reasons), reasons
    assert any("kept dense by its producer" in r for r in reasons), reasons
    assert not _rewritten(backend)["prune"]


def test_no_recompile_over_batches_and_dynamic_shapes_work() -> None:
    torch.manual_seed(0)
    model = Block()
    backend = _backend()
    compiled = torch.compile(model, backend=backend)
    for step in range(5):
        compiled(torch.randn(4, 10, 32, generator=torch.Generator().manual_seed(step))).sum().backward()
    assert len(backend.regions) == 1  # one compile for five batches of one shape
    torch._dynamo.reset()
    backend = _backend()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for batch, seq in ((2, 7), (3, 9), (5, 4)):
        out = compiled(torch.randn(batch, seq, 32))
        out.sum().backward()
        assert out.shape == (batch, seq, 3)
    assert _rewritten(backend)["prune"]
    assert len(backend.regions) == 1  # keep counts stay symbolic: no compile per shape


def test_keep_ratio_patterns_and_config_errors() -> None:
    cfg = ShearConfig.from_options(preset="aggressive", keep_ratios={"*fc2": 0.5})
    assert cfg.keep_ratio_for("layer.0.fc2") == 0.5 and cfg.keep_ratio_for("fc1") == 0.1
    assert not cfg.exact
    with pytest.raises(fxshear.ConfigError, match="keep_ratio"):
        ShearConfig.from_options(keep_ratio=0)
    with pytest.raises(fxshear.ConfigError, match="not built"):
        ShearConfig.from_options(prune_ops=["norm"])
    torch.manual_seed(0)
    backend = _backend(keep_ratios={"fc2": 0.5})
    torch.compile(Block(), backend=backend)(torch.randn(2, 3, 32)).sum().backward()
    assert any("keep 0.5" in name for name in _rewritten(backend)["prune"])


def test_peft_lora_prunes_each_input_once_and_frozen_base_linears_save_nothing() -> None:
    """Two LoRA adapters on every Linear of MiniLM: the frozen base Linears are left alone (they
    save nothing for a weight gradient), and the adapters' A matrices that read one input share
    one pruned copy of it instead of one per adapter."""
    peft = pytest.importorskip("peft")
    from fxshear.zoo.models import build_model

    example = build_model("minilm", dropout=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"],
                             lora_dropout=0.0)
    model = peft.get_peft_model(example.model, config)
    model.add_adapter("second", config)
    model.base_model.set_adapter(["default", "second"])  # both adapters train, both read each input
    backend = _backend()
    batch = example.make_batch(2, 16, seed=1)
    torch.compile(model, backend=backend)(**batch).backward()

    (report,) = [r for region in backend.regions for r in region.pass_reports if r.name == "prune"]
    frozen = {s.module for s in report.skipped if "frozen weight" in s.reason}
    assert len(frozen) == 6 * 6 and all(m.endswith("base_layer") for m in frozen), sorted(frozen)[:4]
    pruned_for = [entry.split(": ", 1)[1].split(", ") for entry in report.rewritten]
    lora_a_copies = [paths for paths in pruned_for if any(".lora_A." in p for p in paths)]
    # Per layer, the A matrices of attention.output.dense read the attention context and those of
    # output.dense the GELU output: one pruned copy each, serving both adapters.  Layer 0's q/k/v
    # read the embeddings' dropout output: one copy for all six.  The other q/k/v and every
    # intermediate.dense read a LayerNorm output, which the norm shares with them instead.
    assert all(p.startswith("base_model.model.encoder.encoder.layer.") for paths in lora_a_copies for p in paths)
    sizes = sorted(len(paths) for paths in lora_a_copies)
    assert sizes == [2] * 12 + [6], lora_a_copies
    for paths in lora_a_copies:
        adapters = [p.rsplit(".", 1)[-1] for p in paths]
        assert adapters.count("default") == adapters.count("second") == len(paths) // 2, paths
    assert len({p for paths in pruned_for for p in paths}) == sum(len(paths) for paths in pruned_for)
    for region in backend.regions:  # the ledger holds the pruned copies, never a base Linear's input
        packed = [e for e in region.ledger.entries if e.introduced_by == "prune"]
        assert len(packed) == 2 * len(report.rewritten)  # values and bits per copy
        dense_gelu_outputs = [e for e in region.ledger.entries if tuple(e.shape) == (2, 16, 1536)]
        assert not dense_gelu_outputs, dense_gelu_outputs  # no Linear kept the FFN input dense
