"""fxshear.reversible (MEFT): invert=True rebuilds every block input and gives the gradients of
invert=False bit for bit (dropout on); what trains, what is saved, and the configuration errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxshear
from fxshear.config import ConfigError
from fxshear.reversible import VARIANTS, reversible_stack
from fxshear.zoo.models import build_model

ARCHITECTURES = ("minilm", "llama", "vit")


@pytest.fixture(scope="module")
def examples() -> dict:
    return {name: build_model(name, dropout=True) for name in ARCHITECTURES}


def _step(example, model: nn.Module, batch: dict, seed: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)  # the same dropout draws in both runs
    loss = example.loss(model, batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _reversible_copy(example, **options) -> nn.Module:
    model = copy.deepcopy(example.model)
    torch.manual_seed(1)  # the same adapter initialisation
    return fxshear.reversible(model, **options)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_inverted_backward_equals_ordinary_autograd_bit_for_bit(examples, name: str, variant: str) -> None:
    example = examples[name]
    batch = example.make_batch(2, 16, seed=0)
    loss_plain, plain = _step(example, _reversible_copy(example, variant=variant, invert=False), batch)
    loss_inverted, inverted = _step(example, _reversible_copy(example, variant=variant, invert=True), batch)
    assert loss_plain == loss_inverted
    assert plain.keys() == inverted.keys() and plain
    for key in plain:
        assert torch.equal(plain[key], inverted[key]), key


def test_only_adapters_and_the_head_train_and_the_state_dict_loads_again(examples) -> None:
    example = examples["minilm"]
    model = _reversible_copy(example, variant="meft1")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".meft_" in n or n.startswith("classifier.") for n in trainable)
    assert {n for n in trainable if n.startswith("classifier.")} == {"classifier.weight", "classifier.bias"}
    blocks = model.encoder.encoder.layer
    assert all(hasattr(b, "meft_f") and hasattr(b, "meft_g") for b in blocks)
    assert blocks[0].meft_f.down.out_features == 8
    again = fxshear.reversible(copy.deepcopy(example.model), variant="meft1")
    again.load_state_dict(model.state_dict())  # same parameter names, strict
    assert isinstance(blocks[0], type(example.model.encoder.encoder.layer[0]))  # still a BertLayer


def test_meft2_has_no_g_adapter_and_keeps_the_whole_block_as_g(examples) -> None:
    model = _reversible_copy(examples["llama"], variant="meft2", adapter_dim=4)
    layer = model.model.layers[0]
    assert hasattr(layer, "meft_f") and not hasattr(layer, "meft_g")
    assert layer.meft_f.down.out_features == 4


def test_the_inverted_stack_saves_far_less(examples) -> None:
    example = examples["minilm"]
    batch = example.make_batch(4, 64, seed=0)
    saved = {}
    for invert in (False, True):
        model = _reversible_copy(example, variant="meft1", invert=invert)
        counted = fxshear.measure_saved_bytes(example.loss, model, batch)
        counted.output.backward()
        saved[invert] = counted.activation_bytes
    assert saved[True] < 0.2 * saved[False], saved


def test_lower_blocks_only_and_checkpointed_inputs(examples) -> None:
    example = examples["llama"]
    batch = example.make_batch(2, 16, seed=0)
    model = _reversible_copy(example, variant="meft3", blocks=1)
    layers = model.model.layers
    assert hasattr(layers[0], "_fxshear_reversible") and not hasattr(layers[1], "_fxshear_reversible")
    _step(example, model, batch)
    plain = _step(example, _reversible_copy(example, variant="meft3", invert=False, checkpoint_every=1), batch)[1]
    kept = _step(example, _reversible_copy(example, variant="meft3", checkpoint_every=1), batch)[1]
    assert all(torch.equal(plain[k], kept[k]) for k in plain)


def test_inexact_arithmetic_shows_the_rebuild_error_growing_with_depth(examples) -> None:
    """MEFT's own arithmetic (exact=False): the error of each rebuilt input, measured."""
    example = examples["minilm"]
    batch = example.make_batch(2, 16, seed=0)
    model = _reversible_copy(example, variant="meft1", exact=False)
    stack = reversible_stack(model)
    stack.measure = True
    _step(example, model, batch)
    errors = [stack.errors[i] for i in sorted(stack.errors, reverse=True)]  # from the top block down
    assert len(errors) == 5 and errors[0] < 1e-5 and errors[-1] > 10 * errors[0], errors
    exact = _reversible_copy(example, variant="meft1")
    exact_stack = reversible_stack(exact)
    exact_stack.measure = True
    _step(example, exact, batch)
    assert max(exact_stack.errors.values()) == 0.0


@pytest.mark.parametrize("options, match", [
    ({"variant": "meft9"}, "variant must be one of"),
    ({"adapter_dim": 0}, "adapter_dim"),
    ({"blocks": [0, 2]}, "consecutive"),
    ({"blocks": 99}, "has 6 blocks"),
    ({"blocks": "encoder.nothing"}, "blocks='encoder.nothing'"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
])
def test_bad_configurations_are_clear_errors(examples, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        fxshear.reversible(copy.deepcopy(examples["minilm"].model), **options)


def test_unknown_architecture_names_the_supported_ones_and_blocks() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"supported: bert .*decoder .*vit .*Point blocks="):
        fxshear.reversible(model)


def test_a_model_made_reversible_twice_is_an_error(examples) -> None:
    model = _reversible_copy(examples["vit"])
    with pytest.raises(ConfigError, match="already reversible"):
        fxshear.reversible(model)


def test_inexact_arithmetic_in_half_precision_warns_with_the_measured_error(examples) -> None:
    model = copy.deepcopy(examples["minilm"].model).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"exact=False.*bfloat16.*tenfold per block.*exact=True"):
        fxshear.reversible(model, exact=False)


def test_float16_warns_that_gradients_need_loss_scaling(examples) -> None:
    model = copy.deepcopy(examples["minilm"].model).to(torch.float16)
    with pytest.warns(UserWarning, match=r"float16 gradients underflow without loss scaling.*GradScaler"):
        fxshear.reversible(model)


def test_exact_inversion_holds_in_bfloat16(examples) -> None:
    example = examples["llama"]
    model = copy.deepcopy(example.model).to(torch.bfloat16)
    torch.manual_seed(1)
    fxshear.reversible(model, variant="meft3")
    stack = reversible_stack(model)
    stack.measure = True
    _step(example, model, example.make_batch(2, 16, seed=0))
    assert stack.errors and max(stack.errors.values()) == 0.0


def _hf_example(kind: str):  # noqa: ANN202
    """Small random-weight configs of other members of the supported families."""
    import transformers

    torch.manual_seed(0)
    if kind == "roberta":
        config = transformers.RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, hidden_dropout_prob=0.1,
                                            attention_probs_dropout_prob=0.1, attn_implementation="eager")
        model = transformers.RobertaForSequenceClassification(config)
    elif kind == "electra":
        config = transformers.ElectraConfig(vocab_size=300, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.1,
                                            attention_probs_dropout_prob=0.1, attn_implementation="eager")
        model = transformers.ElectraForSequenceClassification(config)
    elif kind == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=300, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                               dropout=0.1, attention_dropout=0.1, seq_classif_dropout=0.1,
                                               attn_implementation="eager")
        model = transformers.DistilBertForSequenceClassification(config)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, attention_dropout=0.1,
                                          use_cache=False, attn_implementation="eager")
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.MistralConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, attention_dropout=0.1,
                                            use_cache=False, attn_implementation="eager")
        model = transformers.MistralForCausalLM(config)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1]) if kind in ("roberta", "electra", "distilbert") else ids
    return model.train(), {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("kind, variant", [("roberta", "meft3"), ("electra", "meft3"), ("qwen2", "meft3"),
                                           ("mistral", "meft3"), ("distilbert", "meft1"), ("distilbert", "meft2"),
                                           ("distilbert", "meft3")])
def test_other_family_members_invert_exactly(kind: str, variant: str) -> None:
    model, batch = _hf_example(kind)
    grads = {}
    for invert in (False, True):
        copy_ = copy.deepcopy(model)
        torch.manual_seed(1)
        fxshear.reversible(copy_, variant=variant, invert=invert)
        torch.manual_seed(5)
        copy_(**batch).loss.backward()
        grads[invert] = {n: p.grad.clone() for n, p in copy_.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    assert all(torch.equal(grads[True][k], grads[False][k]) for k in grads[False])


def test_streams_beyond_the_exact_range_are_an_error_not_a_wrong_gradient(examples) -> None:
    example = examples["llama"]
    model = copy.deepcopy(example.model)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e8)  # hidden states far above 2**20
    fxshear.reversible(model, variant="meft1")
    with pytest.raises(RuntimeError, match="beyond the exact fixed-point range"):
        example.loss(model, example.make_batch(2, 8, seed=0)).backward()


@settings(max_examples=12, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), layers=st.integers(1, 3), hidden=st.sampled_from([8, 16, 24]),
       adapter_dim=st.integers(1, 8), batch=st.integers(1, 3), seq=st.integers(2, 9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_inversion_is_exact_over_shapes_and_dtypes(variant: str, layers: int, hidden: int, adapter_dim: int,
                                                   batch: int, seq: int, dtype: torch.dtype) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=2 * hidden, hidden_dropout_prob=0.1,
                                     attention_probs_dropout_prob=0.1, attn_implementation="eager")
    model = transformers.BertForSequenceClassification(config).to(dtype).train()
    ids = torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(seq))
    labels = torch.arange(batch) % 2
    grads = {}
    for invert in (False, True):
        copy_ = copy.deepcopy(model)
        torch.manual_seed(1)
        fxshear.reversible(copy_, variant=variant, adapter_dim=adapter_dim, invert=invert)
        torch.manual_seed(5)
        copy_(input_ids=ids, labels=labels).loss.backward()
        grads[invert] = {n: p.grad.clone() for n, p in copy_.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    assert all(torch.equal(grads[True][k], grads[False][k]) for k in grads[False])
