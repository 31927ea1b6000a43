"""fxshear: a torch.compile backend that saves far less for backward when fine-tuning.

    model = torch.compile(model, backend="fxshear")                    # exact preset (the default)
    model = torch.compile(model, backend=fxshear.backend(preset="exact", memory_budget=0.5))
    report = fxshear.inspect(model, *example_inputs)                    # what is saved, and why
    step = fxshear.train_step(model, optimizer, freeze="bandit")(step)  # per-step freezing
    fxshear.reversible(model, variant="meft1")                          # MEFT: rebuild, don't save
"""

from .ops import register_ops

register_ops()  # every custom op exists before any other part of fxshear is imported

from .api import ledger, regions_of  # noqa: E402
from .backend import ShearBackend, backend
from .config import PRESETS, ConfigError, ShearConfig
from .graph.ledger import Ledger, ModelLedger, SavedTensor
from .integrations import register_accelerate_backend
from .measure import SavedBytes, measure_saved_bytes
from .reversible import reversible
from .selective import block_selective
from .freezing.state import frozen
from .train_step import StepMetrics, TrainStep, train_step

__version__ = "0.1.0"

register_accelerate_backend()  # lets transformers' Trainer name torch_compile_backend="fxshear"


def inspect(model, *example_inputs, preset: str = "exact", example_kwargs=None, **overrides):  # noqa: ANN001, ANN201
    """Compare what fxshear and plain torch.compile save for ``model(*example_inputs, **example_kwargs)``.

    ``overrides`` are fxshear options (e.g. ``memory_budget=0.5``). Returns an
    :class:`fxshear.inspection.InspectionReport` (``.print()``, ``.diff()``, ``.save_html()``).
    """
    from .inspection.report import inspect as _inspect

    return _inspect(model, *example_inputs, preset=preset, example_kwargs=example_kwargs, **overrides)


__all__ = [
    "PRESETS", "ConfigError", "Ledger", "block_selective", "ModelLedger", "SavedBytes", "SavedTensor", "ShearBackend",
    "ShearConfig", "StepMetrics", "TrainStep", "backend", "frozen", "inspect", "ledger", "measure_saved_bytes", "regions_of",
    "register_accelerate_backend", "reversible", "train_step",
]
