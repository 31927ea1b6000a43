"""Lower ``fxshear::act2bit`` to plain aten ops after partitioning, on CPU, so Inductor fuses it.

Why after partitioning: the op must stay opaque until the min-cut has run, or the partitioner
would save the dense pre-activation again (DESIGN §2).  Once forward and backward are split,
what is saved is fixed, and the op is only a kernel: an eager fallback call costs ~10 passes
over the activation, while the same math as aten pointwise ops lets Inductor's C++ backend
fuse GELU into the matmul epilogue and compare-and-pack 4 codes per byte in one loop.

On CUDA the op keeps its Triton kernels; this pass only rewrites CPU nodes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from ..compat import CustomGraphPass, get_hash_for_files
from .act2bit_reference import STEPS


def _fp32(value: float) -> float:
    """The value as torch uses it against an fp32 tensor, exactly representable in fp32."""
    return float(torch.tensor(value, dtype=torch.float32))


# Rounded once here: a torch.tensor() call inside a traced function would become a constant.
_THRESHOLDS = {kind: tuple(_fp32(c) for c in steps.thresholds) for kind, steps in STEPS.items()}
_LEVELS = {kind: tuple(_fp32(v) for v in steps.levels) for kind, steps in STEPS.items()}


def fused_forward(x: torch.Tensor, kind: str, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's forward as traceable aten math: the activation and its packed codes."""
    y = torch.nn.functional.gelu(x, approximate=approximate) if kind == "gelu" else torch.nn.functional.silu(x)
    c1, c2, c3 = _THRESHOLDS[kind]
    xf = x.float()
    codes = (xf > c1).to(torch.uint8) + (xf > c2).to(torch.uint8) + (xf > c3).to(torch.uint8)
    flat = codes.reshape(-1)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    lanes = flat.view(-1, 4)
    packed = lanes[:, 0] | (lanes[:, 1] << 2) | (lanes[:, 2] << 4) | (lanes[:, 3] << 6)
    return y, packed


def fused_backward(grad: torch.Tensor, packed: torch.Tensor, kind: str) -> torch.Tensor:
    """The op's backward as traceable aten math: ``grad * level[code]`` in fp32."""
    _, a1, a12, a123 = _LEVELS[kind]
    shifts = torch.arange(4, dtype=torch.uint8, device=packed.device) * 2
    codes = ((packed.unsqueeze(1) >> shifts) & 3).reshape(-1)[: grad.numel()].view(grad.shape)
    slope = torch.where(codes == 3, a123, torch.where(codes == 2, a12, torch.where(codes == 1, a1, 0.0)))
    return (grad.float() * slope).to(grad.dtype)


def _inline(graph: torch.fx.Graph, node: torch.fx.Node, fn: Callable[..., object],
            tensor_args: Sequence[torch.fx.Node]) -> object:
    """Trace ``fn`` on the nodes' fake values and splice its graph in before ``node``."""
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table

    fakes = [a.meta["val"] for a in tensor_args]
    fake_mode = detect_fake_mode(fakes)
    with fake_mode:
        traced = make_fx(fn, decomposition_table=select_decomp_table())(*fakes)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    env = dict(zip(placeholders, tensor_args))
    with graph.inserting_before(node):
        return graph.graph_copy(traced.graph, env)


def _on_cpu(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)):
        value = value[0]
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


class LowerAct2BitOnCpu(CustomGraphPass):
    """Post-grad pass: replace CPU ``fxshear::act2bit`` / ``act2bit_backward`` nodes by aten math."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or not _on_cpu(node):
                continue
            if node.target is torch.ops.fxshear.act2bit.default:
                x, kind, approximate, impl = node.args
                if impl == "triton":
                    continue
                y, packed = _inline(graph, node, lambda t: fused_forward(t, kind, approximate), [x])
                for user in list(node.users):
                    if user.target is operator.getitem:
                        user.replace_all_uses_with(y if user.args[1] == 0 else packed)
                        graph.erase_node(user)
                if not node.users:
                    graph.erase_node(node)
            elif node.target is torch.ops.fxshear.act2bit_backward.default:
                grad, packed, kind, impl = node.args
                if impl == "triton":
                    continue
                dx = _inline(graph, node, lambda g, p: fused_backward(g, p, kind), [grad, packed])
                node.replace_all_uses_with(dx)
                graph.erase_node(node)

    def uuid(self) -> bytes:
        from ..graph.partitioner import fxshear_source_files

        return get_hash_for_files(fxshear_source_files(), extra=f"torch={torch.__version__}")
