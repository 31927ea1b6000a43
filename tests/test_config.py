"""Every option is validated when the config is built, with an error naming field and values."""

from __future__ import annotations

import pytest
import torch

import fxshear
from fxshear.config import ConfigError, ShearConfig


def test_presets_and_defaults() -> None:
    assert ShearConfig.from_options().preset == "exact"
    assert ShearConfig.from_options(preset="exact").exact
    assert not ShearConfig.from_options(preset="balanced").exact
    assert ShearConfig.from_options(preset="aggressive").act2bit
    assert not ShearConfig.from_options({"preset": "balanced"}, act2bit=False).exact
    assert ShearConfig.from_options({"preset": "balanced"}, act2bit=False, act_from_output="exact_dtypes").exact
    none = ShearConfig.from_options(preset="none")
    assert not (none.share_norms or none.dropout_bits or none.attention_recompute or none.fused_loss
                or none.act2bit) and none.act_from_output == "off"
    exact = ShearConfig.from_options(preset="exact")
    assert exact.share_norms and exact.dropout_bits and exact.attention_recompute and exact.fused_loss
    assert exact.act_from_output == "exact_dtypes" and not exact.act2bit
    assert exact.dropout_rng == "eager" and not exact.prune
    aggressive = ShearConfig.from_options(preset="aggressive")
    assert aggressive.prune and aggressive.keep_ratio == 0.1 and aggressive.act_from_output == "off"
    assert aggressive.dropout_rng == "fast" and ShearConfig.from_options(preset="exact").dropout_rng == "eager"
    assert not aggressive.exact
    assert ShearConfig.from_options(preset="none", prune=True, keep_ratio=1.0).exact  # keeping all is exact


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"preset": "fast"}, "preset must be one of 'none', 'exact', 'balanced', 'aggressive'"),
        ({"act_from_output": "yes"}, "act_from_output must be one of 'off', 'exact_dtypes', 'all'"),
        ({"share_norms": 1}, "share_norms must be True or False"),
        ({"fused_loss": None}, "fused_loss must be True or False"),
        ({"memory_bugdet": 0.5}, "did you mean 'memory_budget'"),
        ({"memory_budget": 1.5}, "memory_budget must lie in [0, 1]"),
        ({"memory_budget": True}, "memory_budget must be a number"),
        ({"memory_budget": "half"}, "memory_budget must be a number"),
        ({"act2bit": "yes"}, "act2bit must be True or False"),
        ({"act2bit_ops": ["gelu", "relu"]}, "act2bit_ops entries must be among 'gelu', 'silu'"),
        ({"kernels": "cuda"}, "kernels must be one of 'auto', 'torch', 'triton'"),
        ({"on_error": "ignore"}, "on_error must be one of 'fallback', 'raise'"),
        ({"exclude": [""]}, "exclude must be a sequence of non-empty strings"),
        ({"dropout_rng": "philox"}, "dropout_rng must be one of 'eager', 'fast'"),
        ({"keep_ratio": 0}, "keep_ratio must be a number in (0, 1]"),
        ({"keep_ratios": {"fc*": 2}}, "keep_ratios['fc*'] must be a number in (0, 1]"),
        ({"keep_ratios": 0.5}, "keep_ratios must be a {module pattern: ratio} mapping"),
        ({"prune": "yes"}, "prune must be True or False"),
        ({"prune_ops": ["norm"]}, "is not built"),
        ({"prune_ops": ["conv"]}, "prune_ops entries must be among 'linear', 'attention', 'softmax'"),
        ({"preset": "aggressive", "prune_ops": ["attention"]}, "pass attention_recompute=False"),
        ({"prune_exclude": [""]}, "prune_exclude must be a sequence of non-empty strings"),
    ],
)
def test_bad_options_name_the_field(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        fxshear.backend(**options)
    assert message in str(error.value)


def test_string_backend_rejects_bad_options_on_first_call() -> None:
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="fxshear", options={"presett": "exact"})
    with pytest.raises(Exception, match="did you mean 'preset'"):
        compiled(torch.randn(2, 4))


def test_config_json_is_stable() -> None:
    a = ShearConfig.from_options(preset="exact", exclude=["head*"])
    b = ShearConfig.from_options(exclude=("head*",), preset="exact")
    assert a.to_json() == b.to_json()
