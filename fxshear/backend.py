"""The ``fxshear`` torch.compile backend.

Pipeline per graph Dynamo hands us (docs/design.md §1): torch-IR passes substitute fxshear custom ops →
Inductor's ``compile_fx`` runs AOTAutograd, Inductor's joint passes, our steered partitioner
(min-cut under ``memory_budget``) and lowering.  Each pass runs on a copy and is dropped if it
raises; if compiling the rewritten graph fails, the unmodified graph is compiled instead.
Training never breaks because of fxshear (unless ``on_error="raise"``).
"""

from __future__ import annotations

import itertools
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from .compat import check_torch_version, is_dynamo_restart
from .config import DEFAULT_PRESET, ConfigError, ShearConfig
from .log import log
from .passes import PASSES
from .passes.draw_order import order_draws
from .passes.base import PassReport
from .graph.partitioner import SavedSizes
from .region import Region, compile_and_record, copy_graph_module, unrewritten_sizes
from .freezing.dispatcher import FreezeDispatcher

_backend_ids = itertools.count()
#: Every backend ever created, so ``fxshear.ledger(model)`` can find a model's regions.
_BACKENDS: "weakref.WeakValueDictionary[int, ShearBackend]" = weakref.WeakValueDictionary()
_DEFAULT_BACKENDS: dict[str, ShearBackend] = {}


class ShearBackend:
    """A configured fxshear backend; pass it to ``torch.compile(backend=...)``."""

    def __init__(self, cfg: ShearConfig | None = None, *, codegen: bool = True,
                 pass_names: Sequence[str] | None = None) -> None:
        """``codegen=False`` is the analysis mode of ``fxshear.inspect``: graphs are traced and
        partitioned exactly as for Inductor, but no kernels are generated (the partitioned aten
        graphs run eagerly), so inspecting a model takes seconds, not minutes.

        ``pass_names`` limits the passes run to those named (inspection measures what each pass
        removes by adding them one at a time)."""
        check_torch_version()
        self.cfg = cfg or ShearConfig.from_options()
        self.codegen = codegen
        self.pass_names = None if pass_names is None else frozenset(pass_names)
        self.id = next(_backend_ids)
        self.regions: list[Region] = []
        #: One per trainable region when ``cfg.freezing``: picks the graph for each freeze mask.
        self.dispatchers: list[FreezeDispatcher] = []
        _BACKENDS[self.id] = self

    def __repr__(self) -> str:
        return f"ShearBackend(preset={self.cfg.preset!r}, regions={len(self.regions)})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                 options: Mapping[str, Any] | None = None, mode: str | None = None) -> Callable:
        if options:  # torch.compile(model, backend=fxshear.backend(...), options={...})
            inner = ", ".join(f"{k}={v!r}" for k, v in options.items())
            raise ConfigError(f"torch.compile(options=...) does not reach a configured fxshear backend; "
                              f"pass them to it: backend=fxshear.backend({inner})")
        _warn_mode_ignored(mode)
        region = Region.create(self.cfg, gm, example_inputs)
        self.regions.append(region)
        try:
            original = copy_graph_module(gm)
            rewritten = self._run_passes(gm, region) if region.has_backward else gm
            if region.has_backward:
                self._say_what_the_dtype_and_device_allow(region, example_inputs)
            region.reference = self._reference(original, example_inputs, region)
            if self.cfg.freezing and region.has_backward:
                region.gated = frozenset(region.trainable_parameter_indices())
            compiled = self._compile_with_fallback(rewritten, original, example_inputs, region)
        except Exception as error:
            if is_dynamo_restart(error):  # Dynamo traces the frame again and calls us anew
                self.regions.remove(region)
            raise
        if not region.gated:
            return compiled
        dispatcher = FreezeDispatcher(region, compiled, max_variants=self.cfg.freeze_variants, codegen=self.codegen)
        self.dispatchers.append(dispatcher)
        return dispatcher

    def _compile_with_fallback(self, rewritten: torch.fx.GraphModule, original: torch.fx.GraphModule,
                               example_inputs: Sequence[Any], region: Region) -> Callable:
        try:
            return self._compile(rewritten, example_inputs, region)
        except Exception as error:  # noqa: BLE001 - any failure must not stop training
            if self.cfg.on_error == "raise" or is_dynamo_restart(error):
                raise
            region.fallback_reason = f"{type(error).__name__}: {error}"
            log.warning("fxshear: compiling %s with its rewrites failed (%s); compiling it unmodified",
                        region.name, region.fallback_reason)
            log.debug("%s", traceback.format_exc())
            region.pass_reports = []
            return self._compile(original, example_inputs, region)

    def _run_passes(self, gm: torch.fx.GraphModule, region: Region) -> torch.fx.GraphModule:
        for graph_pass in PASSES:
            if not graph_pass.applies(self.cfg):
                continue
            if self.pass_names is not None and graph_pass.name not in self.pass_names:
                continue
            candidate = copy_graph_module(gm)
            try:
                report = graph_pass.run(candidate, self.cfg)
            except Exception as error:  # noqa: BLE001 - a failing pass is dropped, not fatal
                if self.cfg.on_error == "raise" or is_dynamo_restart(error):
                    raise
                report = PassReport(graph_pass.name, error=f"{type(error).__name__}: {error}")
                log.warning("fxshear pass %s failed on %s and was skipped: %s",
                            graph_pass.name, region.name, report.error)
                region.pass_reports.append(report)
                continue
            region.pass_reports.append(report)
            gm = candidate
        order_draws(gm)
        return gm

    def _say_what_the_dtype_and_device_allow(self, region: Region, example_inputs: Sequence[Any]) -> None:
        """One warning per region when its dtype or device keeps the preset from doing what it
        says: the passes' per-pattern reasons are INFO lines a user does not see."""
        tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
        floats = {t.dtype for t in tensors if t.is_floating_point()}
        skipped = sum(len(r.skipped) for r in region.pass_reports)
        rewritten = sum(len(r.rewritten) for r in region.pass_reports)
        if floats and not floats & SUPPORTED_DTYPES and self.cfg.preset != "none":
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in floats))
            log.warning("fxshear: %s computes in %s; the %r preset's rewrites handle float32, float16 and "
                        "bfloat16, so %d patterns were left alone (%d rewritten) and it saves about what "
                        "torch.compile saves. Cast the model (model.float()) to use them",
                        region.name, names, self.cfg.preset, skipped, rewritten)
        devices = {t.device.type for t in tensors}
        if self.cfg.kernels == "triton" and devices and "cuda" not in devices:
            log.warning("fxshear: kernels='triton' asks for Triton kernels, but %s runs on %s; Triton kernels "
                        "run on CUDA, so the torch implementations run instead (kernels='auto' says the same "
                        "without this warning)", region.name, ", ".join(sorted(devices)))

    def _reference(self, original: torch.fx.GraphModule, example_inputs: Sequence[Any],
                   region: Region) -> SavedSizes | None:
        """What plain Inductor would save, when a memory budget must be read against it.

        Only needed for a budget strictly between 0 and 1 on a graph some pass rewrote; it costs
        one extra trace and partition (no code generation).
        """
        budget = self.cfg.memory_budget
        if budget is None or not 0.0 < budget < 1.0 or not any(r.rewritten for r in region.pass_reports):
            return None
        try:
            return unrewritten_sizes(original, example_inputs, budget)
        except Exception as error:  # noqa: BLE001 - fall back to PyTorch's own reading of the budget
            if is_dynamo_restart(error):
                raise
            log.warning("fxshear: could not measure %s unrewritten (%s); memory_budget applies to the "
                        "rewritten graph as PyTorch reads it", region.name, error)
            return None

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], region: Region) -> Callable:
        region.index_origins(gm)
        return compile_and_record(gm, example_inputs, self.cfg, region.recorder(id(gm.graph)),
                                  codegen=self.codegen, reference=region.reference,
                                  frozen=region.frozen, gated=region.gated)


def backend(preset: str = DEFAULT_PRESET, **overrides: Any) -> ShearBackend:
    """A configured backend: ``torch.compile(model, backend=fxshear.backend(preset="exact"))``."""
    if "options" in overrides:  # torch.compile's spelling; from_options would take it as its mapping
        inner = {**overrides.pop("options"), **overrides}
        raise ConfigError(f"fxshear.backend takes its options as keywords, not options=: write "
                          f"fxshear.backend({', '.join(f'{k}={v!r}' for k, v in inner.items())})")
    return ShearBackend(ShearConfig.from_options(preset=preset, **overrides))


def fxshear(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
            options: Mapping[str, Any] | None = None, mode: str | None = None) -> Callable:
    """Entry point for ``torch.compile(model, backend="fxshear", options={...})``.

    One backend per distinct options, so regions of differently configured models stay apart.
    """
    cfg = ShearConfig.from_options(options)
    _warn_mode_ignored(mode)
    key = cfg.to_json()
    if key not in _DEFAULT_BACKENDS:
        _DEFAULT_BACKENDS[key] = ShearBackend(cfg)
    return _DEFAULT_BACKENDS[key](gm, example_inputs)


SUPPORTED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
_MODES_WARNED: set[str] = set()


def _warn_mode_ignored(mode: str | None) -> None:
    """torch.compile's ``mode`` picks Inductor settings for Inductor's own entry point; fxshear
    lowers with the global Inductor config, so a mode would silently do nothing: say so, once."""
    if mode in (None, "default") or mode in _MODES_WARNED:
        return
    _MODES_WARNED.add(mode)
    log.warning("fxshear: torch.compile(mode=%r) is not applied under backend='fxshear' (Inductor reads its "
                "settings from torch._inductor.config here); set the options it stands for there, e.g. "
                "torch._inductor.config.max_autotune = True for 'max-autotune'", mode)


def backends() -> list[ShearBackend]:
    """Live backends, oldest first."""
    return [_BACKENDS[k] for k in sorted(_BACKENDS.keys())]
