"""A Hugging Face Trainer picks fxshear up by name: torch_compile_backend="fxshear"."""

from __future__ import annotations

import pytest
import torch

from fxshear.zoo.models import build_model

pytestmark = pytest.mark.slow


class _Batches(torch.utils.data.Dataset):
    def __init__(self, example, n: int) -> None:  # noqa: ANN001
        self.items = []
        for i in range(n):
            batch = example.make_batch(1, 16, seed=i)
            self.items.append({k: v[0] for k, v in batch.items()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def test_trainer_runs_a_few_steps_under_fxshear(tmp_path) -> None:  # noqa: ANN001
    from transformers import Trainer, TrainingArguments

    import fxshear

    example = build_model("llama", dropout=False)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
        torch_compile=True, torch_compile_backend="fxshear", report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in example.model.named_parameters()}
    trainer = Trainer(model=example.model, args=args, train_dataset=_Batches(example, 6))
    result = trainer.train()
    assert result.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in example.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter was updated"
    regions = fxshear.regions_of(example.model)
    assert regions and any(report.rewritten for r in regions for report in r.pass_reports)
