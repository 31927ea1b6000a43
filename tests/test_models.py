"""Example models and the docstring dataset: they build offline, train, and are deterministic."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fxshear.zoo.data import DocstringDataset, load_docstring_dataset, tokenize_batches
from fxshear.zoo.models import (
    MODEL_NAMES,
    ExampleModel,
    MiniLMClassifier,
    build_model,
    load_minilm_tokenizer,
    load_user_model,
    minilm_model_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RANDOM_MODELS = ("llama", "gpt2", "vit")


@pytest.fixture(scope="module")
def minilm() -> ExampleModel:
    """Loading the real checkpoint costs a few seconds: share one instance across tests."""
    return build_model("minilm", seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_minilm_tokenizer()


@pytest.fixture(scope="module")
def dataset() -> DocstringDataset:
    return load_docstring_dataset(num_classes=4, seed=0)


def _built(name: str, minilm: ExampleModel) -> ExampleModel:
    return minilm if name == "minilm" else build_model(name)


# --------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loss_is_finite_and_backward_reaches_every_parameter(
    name: str, minilm: ExampleModel
) -> None:
    example = _built(name, minilm)
    assert example.name == name and example.model.training
    example.model.zero_grad(set_to_none=True)
    batch = example.make_batch(batch_size=2, seq_len=16, seed=0)
    assert "labels" in batch

    loss = example.loss(example.model, batch)

    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in example.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    example.model.zero_grad(set_to_none=True)


def test_loss_works_through_torch_compile() -> None:
    """``loss`` must accept the OptimizedModule; aot_eager keeps this to a few seconds."""
    example = build_model("gpt2", dropout=False)
    batch = example.make_batch(2, 16, seed=0)
    compiled = torch.compile(example.model, backend="aot_eager", fullgraph=True)
    try:
        compiled_loss = example.loss(compiled, batch)
        compiled_loss.backward()
        assert torch.allclose(compiled_loss, example.loss(example.model, batch), atol=1e-5)
        assert example.model.lm_head.weight.grad is not None
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", RANDOM_MODELS)
def test_same_seed_gives_identical_weights_and_batches(name: str) -> None:
    first, second = build_model(name, seed=3), build_model(name, seed=3)
    other = build_model(name, seed=4)
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    assert not all(torch.equal(first_state[k], v) for k, v in other.model.state_dict().items())

    batch_a, batch_b = first.make_batch(2, 16, seed=5), second.make_batch(2, 16, seed=5)
    assert batch_a.keys() == batch_b.keys()
    assert all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)
    batch_c = first.make_batch(2, 16, seed=6)
    assert not all(torch.equal(batch_a[k], batch_c[k]) for k in batch_a)


def test_minilm_head_and_batches_are_seeded(minilm: ExampleModel) -> None:
    again = build_model("minilm", seed=0, dropout=False)
    assert torch.equal(minilm.model.classifier.weight, again.model.classifier.weight)
    batch_a, batch_b = minilm.make_batch(3, 12, seed=1), again.make_batch(3, 12, seed=1)
    assert all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)
    mask = batch_a["attention_mask"]
    assert batch_a["input_ids"].shape == mask.shape == (3, 12)
    assert (batch_a["input_ids"][:, 0] == 101).all()  # [CLS]
    assert (batch_a["input_ids"][mask == 0] == 0).all()  # [PAD]


def test_dropout_flag_sets_probabilities() -> None:
    with_dropout = build_model("gpt2", dropout=True).model.config
    without = build_model("vit", dropout=False).model.config
    assert with_dropout.attn_pdrop == with_dropout.resid_pdrop == 0.1
    assert with_dropout.activation_function == "gelu_new"
    assert without.hidden_dropout_prob == without.attention_probs_dropout_prob == 0.0
    assert build_model("llama", dropout=True).model.config.attention_dropout == 0.1


def test_vit_batch_ignores_seq_len() -> None:
    vit = build_model("vit")
    batch = vit.make_batch(batch_size=3, seq_len=999, seed=0)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["labels"].shape == (3,)


def test_minilm_has_the_pretrained_weights(minilm: ExampleModel) -> None:
    from safetensors.torch import load_file

    checkpoint = load_file(str(minilm_model_path() / "model.safetensors"))
    token_id = 7592  # "hello"
    loaded = minilm.model.encoder.embeddings.word_embeddings.weight
    stored = checkpoint["embeddings.word_embeddings.weight"]
    assert loaded[token_id, 0].item() == stored[token_id, 0].item()
    assert torch.equal(loaded, stored)
    assert minilm.model.encoder.config._attn_implementation == "eager"
    assert minilm.model.encoder.config.hidden_dropout_prob == 0.1


def test_minilm_sentence_embeddings_are_semantic(minilm: ExampleModel, tokenizer) -> None:
    sentences = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
    ]
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    classifier: MiniLMClassifier = minilm.model
    classifier.eval()
    try:
        with torch.no_grad():
            embeddings = classifier.embed(encoded["input_ids"], encoded["attention_mask"])
    finally:
        classifier.train()
    similar = F.cosine_similarity(embeddings[0], embeddings[1], dim=0)
    unrelated = F.cosine_similarity(embeddings[0], embeddings[2], dim=0)
    assert similar > 0.6 and similar > unrelated + 0.3


def test_minilm_forward_without_labels_returns_logits(minilm: ExampleModel) -> None:
    batch = minilm.make_batch(2, 8, seed=0)
    batch.pop("labels")
    with torch.no_grad():
        logits = minilm.model(**batch)
    assert logits.shape == (2, 2)


def test_unknown_model_name_lists_accepted_names() -> None:
    with pytest.raises(ValueError, match="minilm, llama, gpt2, vit"):
        build_model("bert-large")
    with pytest.raises(ValueError, match="small, bench"):
        build_model("llama", size="huge")


# --------------------------------------------------------------------------------------
# user models

USER_MODULE = '''
import torch
from torch import nn


class Scale(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x, y):
        return self.linear(x) * y, "not a tensor"


def tiny_factory(width=4):
    torch.manual_seed(0)
    return Scale(width), (torch.ones(2, width), torch.full((2, width), 2.0))


def not_a_model():
    return 42
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "fxshear_user_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fxshear_user_models"
    sys.modules.pop("fxshear_user_models", None)


def test_load_user_model_wraps_a_module_and_inputs(user_module: str) -> None:
    example = load_user_model(f"{user_module}:tiny_factory", width=3)
    assert isinstance(example, ExampleModel) and example.model.training
    batch = example.make_batch(8, 128, seed=1)
    assert set(batch) == {"x", "y"} and batch["x"].shape == (2, 3)
    loss = example.loss(example.model, batch)
    expected = (example.model.linear(batch["x"]) * batch["y"]).sum()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert example.model.linear.weight.grad is not None


def test_load_user_model_passes_through_example_models(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "fxshear_builtin_passthrough.py").write_text(
        "from fxshear.zoo.models import build_model\n"
        "def make(**kwargs):\n    return build_model('llama', **kwargs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        example = load_user_model("fxshear_builtin_passthrough:make", seed=1)
    finally:
        sys.modules.pop("fxshear_builtin_passthrough", None)
    assert example.name == "llama"


@pytest.mark.parametrize(
    "spec", ["", "no_colon", "a:b:c", ":factory", "module:", "bad-name:f", "mod:1f"]
)
def test_load_user_model_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="malformed model spec"):
        load_user_model(spec)


def test_load_user_model_reports_missing_pieces(user_module: str) -> None:
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz"):
        load_user_model("no_such_module_xyz:factory")
    with pytest.raises(ValueError, match="has no attribute"):
        load_user_model(f"{user_module}:missing")
    with pytest.raises(TypeError, match="must return an ExampleModel"):
        load_user_model(f"{user_module}:not_a_model")


# --------------------------------------------------------------------------------------
# docstring dataset


def test_dataset_is_balanced_and_splits_are_disjoint(dataset: DocstringDataset) -> None:
    assert dataset.label_names == ("asyncio", "email", "logging", "xml")
    train_counts = Counter(label for _, label in dataset.train)
    held_out_counts = Counter(label for _, label in dataset.held_out)
    assert set(train_counts) == set(held_out_counts) == set(range(4))
    assert len(set(train_counts.values())) == 1 and len(set(held_out_counts.values())) == 1
    assert train_counts[0] >= 100
    per_class = train_counts[0] + held_out_counts[0]
    assert held_out_counts[0] == round(per_class * 0.2)

    train_texts = {text for text, _ in dataset.train}
    held_out_texts = {text for text, _ in dataset.held_out}
    assert len(train_texts) == len(dataset.train) and len(held_out_texts) == len(dataset.held_out)
    assert not train_texts & held_out_texts
    assert all(40 <= len(text) <= 300 for text in train_texts | held_out_texts)


def test_dataset_respects_class_count_and_cap() -> None:
    small = load_docstring_dataset(num_classes=3, seed=1, held_out_fraction=0.25, max_per_class=20)
    assert small.num_classes == 3
    assert Counter(label for _, label in small.train) == {0: 15, 1: 15, 2: 15}
    assert Counter(label for _, label in small.held_out) == {0: 5, 1: 5, 2: 5}
    with pytest.raises(ValueError, match="num_classes"):
        load_docstring_dataset(num_classes=1)
    with pytest.raises(ValueError, match="held_out_fraction"):
        load_docstring_dataset(held_out_fraction=1.0)


def _fingerprint(dataset: DocstringDataset) -> str:
    serialised = json.dumps([dataset.train, dataset.held_out, dataset.label_names])
    return hashlib.sha256(serialised.encode()).hexdigest()


def test_dataset_is_deterministic_across_processes(dataset: DocstringDataset) -> None:
    assert _fingerprint(load_docstring_dataset(num_classes=4, seed=0)) == _fingerprint(dataset)
    assert _fingerprint(load_docstring_dataset(num_classes=4, seed=1)) != _fingerprint(dataset)
    # string hashing (and so set order) is randomised per process: the result must not depend on it
    script = (
        "import hashlib, json; from fxshear.zoo.data import load_docstring_dataset as load; "
        "d = load(num_classes=4, seed=0); "
        "print(hashlib.sha256(json.dumps([d.train, d.held_out, d.label_names]).encode())"
        ".hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == _fingerprint(dataset)


def test_tokenize_batches_have_static_shapes(dataset: DocstringDataset, tokenizer) -> None:
    batches = list(tokenize_batches(dataset.held_out, tokenizer, batch_size=16, seq_len=32, seed=0))
    assert len(batches) == len(dataset.held_out) // 16
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (16, 32)
        assert batch["labels"].shape == (16,)
        assert all(t.dtype == torch.long for t in batch.values())
    again = next(tokenize_batches(dataset.held_out, tokenizer, batch_size=16, seq_len=32, seed=0))
    assert all(torch.equal(again[k], batches[0][k]) for k in again)

    with_remainder = list(
        tokenize_batches(dataset.held_out, tokenizer, 16, 32, seed=0, drop_last=False)
    )
    assert sum(len(b["labels"]) for b in with_remainder) == len(dataset.held_out)
    assert all(b["input_ids"].shape[1] == 32 for b in with_remainder)


def test_minilm_trains_on_a_docstring_batch(dataset: DocstringDataset, tokenizer) -> None:
    classifier = build_model("minilm", num_labels=dataset.num_classes, dropout=False).model
    batch = next(tokenize_batches(dataset.train, tokenizer, batch_size=4, seq_len=32, seed=0))
    loss = classifier(**batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert classifier.classifier.weight.grad is not None
