"""fxshear::dropout_draw + dropout_apply: eager-equal masks, outputs, gradients and RNG use; 1-bit packing; opcheck."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxshear.kernels import rng_native
from fxshear.kernels.dropout_bits import (
    dropout,
    dropout_bits,
    apply_math,
    dropout_apply,
    dropout_draw,
    noise_value,
    pack_bits,
    pack_bits_now,
    packed_numel,
    unpack_bits,
)
from fxshear.kernels.infra.lowering import lowerable_ops

F = torch.nn.functional
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PROBABILITIES = [0.0, 0.1, 0.123, 0.5, 0.9, 1.0]
BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
              torch.float64: torch.int64}


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape, dtype and bits (signed zeros included), NaN payloads aside."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    bits = BITS_DTYPE[expected.dtype]
    assert torch.equal(actual[~nan].contiguous().view(bits), expected[~nan].contiguous().view(bits))


def with_specials(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN, +-inf and -0.0 in its first elements (eager keeps them as they are)."""
    flat = x.detach().reshape(-1).clone()
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=x.dtype)
    n = min(flat.numel(), specials.numel())
    flat[:n] = specials[:n]
    return flat.view(x.shape)


def eager_and_ours(x: torch.Tensor, p: float, grad: torch.Tensor, seed: int = 1234):
    """Run eager F.dropout and the op from the same seed: outputs, input grads, RNG states after."""
    xa = x.clone().requires_grad_()
    torch.manual_seed(seed)
    ya = F.dropout(xa, p, training=True)
    state_a = torch.get_rng_state()
    ya.backward(grad)
    xb = x.clone().requires_grad_()
    torch.manual_seed(seed)
    yb, bits = dropout_bits(xb, p, "torch")
    state_b = torch.get_rng_state()
    yb.backward(grad)
    return (ya, xa.grad, state_a), (yb, xb.grad, state_b), bits


@pytest.mark.parametrize("p", PROBABILITIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_output_gradient_and_rng_are_eager_bitwise(dtype: torch.dtype, p: float) -> None:
    x = with_specials(torch.randn(37, 29).to(dtype))
    grad = with_specials(torch.randn(37, 29).to(dtype).flip(0))
    (ya, ga, state_a), (yb, gb, state_b), bits = eager_and_ours(x, p, grad)
    assert_bitwise_equal(yb, ya)
    assert_bitwise_equal(gb, ga)
    assert torch.equal(state_a, state_b)  # the op consumed the global generator as eager did
    assert bits.dtype == torch.uint8 and bits.shape == (packed_numel(x.numel()),)


@pytest.mark.parametrize("p", [0.1, 0.123, 0.5, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_is_eagers_mask(dtype: torch.dtype, p: float) -> None:
    """The kept set is the one eager draws (CPU ``_dropout``: bernoulli_ on empty_like(x))."""
    x = torch.randn(13, 21).to(dtype)
    torch.manual_seed(7)
    eager_keep = torch.empty_like(x).bernoulli_(1 - p) != 0
    torch.manual_seed(7)
    _, native_keep = torch.ops.aten.native_dropout.default(x, p, True)
    torch.manual_seed(7)
    _, bits = dropout_bits(x, p, "torch")
    keep = unpack_bits(bits, x.numel()).view(x.shape)
    assert torch.equal(keep, eager_keep)
    assert torch.equal(keep, native_keep)
    assert 0 < keep.sum() < keep.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_and_3d_inputs_are_eager_bitwise(dtype: torch.dtype) -> None:
    for x in (torch.randn(9, 17).to(dtype).t(), torch.randn(2, 5, 11).to(dtype).transpose(0, 2),
              torch.randn(3, 4, 10).to(dtype)[:, 1:, ::2]):
        assert not x.is_contiguous()
        grad = torch.randn(x.shape).to(dtype)
        (ya, ga, state_a), (yb, gb, state_b), bits = eager_and_ours(x, 0.3, grad)
        assert yb.stride() == torch.empty_like(x).stride()
        assert_bitwise_equal(yb, ya)
        assert_bitwise_equal(gb, ga)
        assert torch.equal(state_a, state_b)
        # bits follow x's logical order whatever its strides
        assert torch.equal(unpack_bits(bits, x.numel()).view(x.shape), ya != 0)


def test_zero_and_one_probabilities() -> None:
    x = torch.randn(5, 3)
    state = torch.get_rng_state()
    y, bits = dropout_bits(x, 0.0, "torch")
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert bits.tolist() == [0xFF, 0x7F]  # 15 kept elements, the pad bit is 0
    y, bits = dropout_bits(x, 1.0, "torch")
    assert torch.equal(y, torch.zeros_like(x)) and bits.tolist() == [0, 0]
    assert torch.equal(torch.get_rng_state(), state)  # neither draws, as in eager
    grad = torch.randn(5, 3)
    assert torch.equal(dropout_apply(grad, bits, 1.0, "torch"), torch.zeros_like(grad))


def test_empty_input() -> None:
    x = torch.empty(0, 4, requires_grad=True)
    y, bits = dropout_bits(x, 0.5, "torch")
    assert y.shape == (0, 4) and bits.shape == (0,)
    y.sum().backward()
    assert x.grad.shape == (0, 4)


def test_training_flag_and_helper() -> None:
    x = torch.randn(8, 8)
    assert dropout(x, 0.5, training=False) is x
    torch.manual_seed(0)
    expected = F.dropout(x, 0.25, training=True)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.25), expected)


def test_only_the_bits_are_saved() -> None:
    x = torch.randn(10, 30, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = dropout_bits(x, 0.5, "torch")
    assert len(saved) == 1
    assert saved[0].dtype == torch.uint8 and saved[0].shape == (packed_numel(300),)
    y.sum().backward()


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 19), min_size=1, max_size=3).map(tuple), density=st.floats(0, 1))
def test_pack_roundtrip_and_bit_order(shape: tuple[int, ...], density: float) -> None:
    mask = torch.rand(shape) < density
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (packed_numel(mask.numel()),)
    assert torch.equal(unpack_bits(bits, mask.numel()), mask.reshape(-1))
    flat = mask.reshape(-1).tolist()
    expected = [sum(int(v) << j for j, v in enumerate(flat[8 * i: 8 * i + 8])) for i in range(bits.numel())]
    assert bits.tolist() == expected  # element i -> byte i // 8, bit i % 8, pad bits 0


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 19), min_size=1, max_size=3).map(tuple), density=st.floats(0, 1),
       transpose=st.booleans(), as_uint8=st.booleans())
def test_eager_packing_matches_traceable_packing(shape: tuple[int, ...], density: float, transpose: bool,
                                                 as_uint8: bool) -> None:
    """The numpy packing the draw ops use on CPU writes exactly pack_bits' layout, strided input too."""
    mask = torch.rand(shape) < density
    if transpose:
        mask = mask.transpose(0, -1)
    if as_uint8:
        mask = mask.to(torch.uint8)
    assert torch.equal(pack_bits_now(mask), pack_bits(mask))


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(0, 200), density=st.floats(0, 1), spare=st.integers(0, 7))
def test_cpu_unpack_op_matches_the_aten_math(numel: int, density: float, spare: int) -> None:
    """fxshear::unpack_flags (numpy on CPU) reads exactly what the traceable math reads."""
    from fxshear.kernels.infra.bits import unpack_bits_math

    mask = torch.rand(numel) < density
    bits = pack_bits(mask)
    flags = torch.ops.fxshear.unpack_flags(bits, numel)
    assert flags.dtype == torch.bool and torch.equal(flags, mask)
    assert torch.equal(unpack_bits_math(bits, numel), mask)
    prefix = max(numel - spare, 0)  # fewer flags than the bytes hold: the first ones
    assert torch.equal(torch.ops.fxshear.unpack_flags(bits, prefix), mask[:prefix])


def test_cpu_unpack_op_checks() -> None:
    bits = pack_bits(torch.rand(37) < 0.5)
    torch.library.opcheck(torch.ops.fxshear.unpack_flags.default, (bits, 37))
    with pytest.raises(ValueError, match="hold 40 flags"):
        torch.ops.fxshear.unpack_flags(bits, 41)


def test_lowering_unpacks_each_mask_once() -> None:
    """Two lowered reads of the same bits share one unpack (an opaque op is not CSE'd)."""
    from fxshear.kernels.infra.lowering import LowerOpsOnCpu
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(4, 8)
    bits = pack_bits(torch.rand(4, 8) < 0.8)

    def twice(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return dropout_apply(x, bits, 0.2, "torch") + dropout_apply(x * 2, bits, 0.2, "torch")

    gm = make_fx(twice, tracing_mode="fake")(x, bits)
    LowerOpsOnCpu()(gm.graph)
    gm.recompile()
    unpacks = [n for n in gm.graph.nodes if n.target is torch.ops.fxshear.unpack_flags.default]
    assert len(unpacks) == 1
    torch.testing.assert_close(gm(x, bits), twice(x, bits))


def test_noise_value_is_eagers_noise() -> None:
    """The Python constant of the lowering equals eager's ``ones.div_(1 - p)`` in every dtype."""
    generator = torch.Generator().manual_seed(0)
    ps = torch.rand(300, generator=generator, dtype=torch.float64).tolist() + [0.1, 0.123, 1 - 1e-7, 0.99999, 1e-9]
    for dtype in DTYPES + [torch.float64]:
        ones = torch.ones(64, dtype=dtype)  # long enough for the vectorized kernel
        for p in ps:
            expected = ones.clone().div_(1 - p)
            assert torch.equal(expected, torch.full_like(ones, noise_value(p, dtype))), (dtype, p)


def test_only_the_application_and_fast_draws_are_lowered() -> None:
    from fxshear.kernels.infra.lowering import _CONDITIONS

    ops = lowerable_ops()
    assert torch.ops.fxshear.dropout_apply.default in ops
    # An eager-stream draw is never inlined (Inductor would re-seed it); a fast one is.
    accepts = _CONDITIONS[torch.ops.fxshear.dropout_draw.default]
    assert not accepts((None, 0.1, "auto"), {}) and not accepts((None, 0.1, "auto", "eager"), {})
    assert accepts((None, 0.1, "auto", "fast"), {})
    # ... unless the C Philox kernel draws it (faster than Inductor's rand): then it stays opaque.
    node = torch.fx.Graph().placeholder("x")
    node.meta["val"] = torch.empty(3)
    assert accepts((node, 0.1, "auto", "fast"), {}) == (not rng_native.usable("cpu"))
    assert torch.Tag.nondeterministic_seeded in torch.ops.fxshear.dropout_draw.default.tags
    assert torch.Tag.nondeterministic_seeded not in torch.ops.fxshear.dropout_apply.default.tags


def test_apply_is_its_own_adjoint() -> None:
    """The gradient of ``dropout_apply`` is a second application: eager's dropout gradient."""
    x = torch.randn(7, 9, requires_grad=True)
    bits = dropout_draw(x, 0.4, "torch")
    grad = torch.randn(7, 9)
    (dx,) = torch.autograd.grad(dropout_apply(x, bits, 0.4, "torch"), x, grad)
    assert torch.equal(dx, dropout_apply(grad, bits, 0.4, "torch"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lowering_traced_equals_the_op(dtype: torch.dtype) -> None:
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxshear.kernels.dropout_bits import _lower_apply

    x = torch.randn(6, 11).to(dtype)
    grad = with_specials(torch.randn(6, 11).to(dtype))
    for p in PROBABILITIES + [0.99999]:
        _, bits = dropout_bits(x, p, "torch")
        traced = make_fx(lambda g, b: _lower_apply(g, b, p, "torch"),  # noqa: B023
                         decomposition_table=select_decomp_table())(grad, bits)
        expected = dropout_apply(grad, bits, p, "torch")
        assert_bitwise_equal(traced(grad, bits), expected)
        assert_bitwise_equal(apply_math(grad, bits, p), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype: torch.dtype) -> None:
    for shape in [(3, 5), (2, 3, 9)]:
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        torch.library.opcheck(dropout_draw, (x, 0.3, "torch"), test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(dropout_draw, (x, 0.3, "torch", "eager", torch.zeros(2, dtype=torch.uint8)),
                              test_utils=("test_schema", "test_faketensor"))
        bits = dropout_draw(x.detach(), 0.3, "torch")
        torch.library.opcheck(dropout_apply, (x, bits, 0.3, "torch"))
        torch.library.opcheck(dropout_apply, (torch.randn(shape, dtype=dtype), bits, 0.3, "torch"))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fast_draw_keeps_one_minus_p(p: float) -> None:
    x = torch.randn(200, 100)
    torch.manual_seed(3)
    keep = unpack_bits(dropout_draw(x, p, "torch", "fast"), x.numel())
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    y = dropout_apply(x, pack_bits(keep), p, "torch")
    assert torch.equal(y != 0, keep.view(x.shape))


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "no-compiler"])
def test_fast_draw_under_inductor(native_on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """rng="fast" under Inductor: the draw stays one opaque call to the C Philox kernel, or (native
    kernels off) becomes Inductor's fused random numbers; forward and backward share the mask."""
    from torch._inductor.utils import run_and_get_code

    import fxshear
    from fxshear.kernels.infra import native

    if not native_on:
        monkeypatch.setenv("FXSHEAR_NATIVE", "0")
    native.load.cache_clear()
    try:
        torch.manual_seed(0)
        lin = torch.nn.Linear(16, 16)
        x, w = torch.randn(4, 8, 16), torch.randn(4, 8, 16)
        compiled = torch.compile(lambda t: F.dropout(lin(t), 0.3, training=True),
                                 backend=fxshear.backend(preset="exact", dropout_rng="fast"))

        def step():  # noqa: ANN202
            y = compiled(x)
            (y * w).sum().backward()
            return y

        y, codes = run_and_get_code(step)
    finally:
        monkeypatch.delenv("FXSHEAR_NATIVE", raising=False)
        native.load.cache_clear()
        torch._dynamo.reset()
    assert any("fxshear.dropout_draw" in code for code in codes) == native_on
    assert ("inductor_random" in codes[0]) != native_on
    scale = y / lin(x).detach()  # 0 or 1 / (1 - p): the mask the forward used
    torch.testing.assert_close(lin.weight.grad, (w * scale).reshape(-1, 16).t() @ x.reshape(-1, 16))


class ParallelDropouts(torch.nn.Module):
    """Three dropouts of one tensor, each before its own Linear: PEFT LoRA's q/k/v adapters."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(12, 5) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(head(F.dropout(x, 0.3, training=True)) for head in self.heads)


@pytest.mark.parametrize("codegen", [False, True], ids=["partitioned", "inductor"])
def test_parallel_draws_are_neither_merged_nor_reordered(codegen: bool) -> None:
    """Three draws with equal arguments: AOTAutograd's CSE merged them into one (it spares only
    aten's random ops) until each draw was chained to the previous one.  Masks, gradients and the
    generator afterwards are eager's."""
    import fxshear
    from fxshear.config import ShearConfig

    torch.manual_seed(0)
    model, x = ParallelDropouts(), torch.randn(4, 7, 12)
    results = []
    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        backend = fxshear.ShearBackend(ShearConfig.from_options(preset="exact"), codegen=codegen)
        run = torch.compile(model, backend=backend) if compiled else model
        torch.manual_seed(5)
        y = run(x)
        y.square().sum().backward()
        after = torch.rand(3)
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()], after))
        if compiled:
            forward = backend.regions[-1].graphs["forward"]
            assert forward.count("fxshear.dropout_draw.default(") == 3
    (y, grads, after), (ref_y, ref_grads, ref_after) = results[1], results[0]
    torch.testing.assert_close(y, ref_y)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert torch.equal(after, ref_after)


def test_order_draws_chains_every_draw_to_the_previous_one() -> None:
    from fxshear.passes.draw_order import order_draws

    def fn(x: torch.Tensor) -> torch.Tensor:
        a = torch.ops.fxshear.dropout_draw.default(x, 0.1, "torch")
        b = torch.ops.fxshear.dropout_draw.default(x, 0.1, "torch")
        return a + b

    gm = torch.fx.symbolic_trace(fn)
    assert order_draws(gm) == 2
    draws = [n for n in gm.graph.nodes if n.target is torch.ops.fxshear.dropout_draw.default]
    assert "after" not in draws[0].kwargs and draws[1].kwargs["after"] is draws[0]
    torch.manual_seed(1)
    first = dropout_draw(torch.empty(40), 0.1, "torch")
    second = dropout_draw(torch.empty(40), 0.1, "torch")
    torch.manual_seed(1)
    assert torch.equal(gm(torch.empty(40)), first + second)


def test_bad_arguments_are_clear() -> None:
    x = torch.randn(10)
    with pytest.raises(ValueError, match="rng must be one of"):
        dropout_draw(x, 0.5, "torch", "philox")
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout_bits(x, 1.5, "torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        dropout_bits(x, 0.5, "cuda")
    with pytest.raises(ValueError, match="bits must be"):
        dropout_apply(x, torch.zeros(1, dtype=torch.uint8), 0.5, "torch")
    with pytest.raises(ValueError, match="bits must be"):
        dropout_apply(x, torch.zeros(2, dtype=torch.int8), 0.5, "torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused (native_dropout) path runs on CUDA only")
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_is_eager_bitwise(dtype: torch.dtype, impl: str) -> None:
    x = torch.randn(33, 130, dtype=dtype, device="cuda")
    grad = torch.randn(33, 130, dtype=dtype, device="cuda")
    for p in PROBABILITIES:
        xa = x.clone().requires_grad_()
        torch.cuda.manual_seed(5)
        ya = F.dropout(xa, p, training=True)
        ya.backward(grad)
        state_a = torch.cuda.get_rng_state()
        xb = x.clone().requires_grad_()
        torch.cuda.manual_seed(5)
        yb, bits = dropout_bits(xb, p, impl)
        yb.backward(grad)
        assert torch.equal(torch.cuda.get_rng_state(), state_a)
        assert_bitwise_equal(yb, ya)
        assert_bitwise_equal(xb.grad, xa.grad)
    bits = dropout_draw(x, 0.3, impl)
    torch.library.opcheck(dropout_apply, (x.clone().requires_grad_(), bits, 0.3, impl))
