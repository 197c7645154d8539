"""The fine-tuning loss: masked labels contribute exactly nothing, and a packed conversation costs what it costs
alone in a sequence of its own (document-aware attention and positions)."""

import numpy as np
import pytest
import torch

from gptscale.config import load_config
from gptscale.data.batch import masked_micro_batch
from gptscale.train.step import _forward
from gptscale.train.trainer import Trainer
from tests.sft.data import prepare_chat, sums, write_chat


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft-loss")
    data = prepare_chat(tmp / "data", write_chat(tmp / "chat.jsonl", sums()[0]), val_fraction=0.0)
    trainer = Trainer(
        load_config(
            [
                "task=sft",
                "model=llama-tiny",
                f"data.path={data}",
                f"run_dir={tmp}/run",
                "train.seq_len=64",
                "parallel.global_batch=4",
                "parallel.micro_batch=4",
                "train.steps=0",
                "checkpoint.resume=none",
                "checkpoint.save_final=false",
            ]
        )
    )
    yield trainer
    trainer.close()


def loss_and_grads(trainer, batch):
    """Summed loss over trained tokens and every parameter's gradient."""
    trainer.model.zero_grad(set_to_none=True)
    loss = (_forward(trainer.model, batch).float() * batch["loss_mask"]).sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


def test_masked_labels_get_exactly_zero_gradient(trainer):
    batch = next(trainer.data.train)
    masked = batch["loss_mask"] == 0
    assert masked.any() and (~masked).any()
    loss, grads = loss_and_grads(trainer, batch)
    perturbed = dict(batch, labels=torch.where(masked, torch.randint_like(batch["labels"], 200), batch["labels"]))
    assert not torch.equal(perturbed["labels"], batch["labels"])
    perturbed_loss, perturbed_grads = loss_and_grads(trainer, perturbed)
    assert torch.equal(loss, perturbed_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, perturbed_grads))
    trained = dict(batch, labels=torch.where(~masked, (batch["labels"] + 1) % 200, batch["labels"]))
    assert not torch.equal(loss_and_grads(trainer, trained)[0], loss), "the comparison can see a label change"


def test_a_packed_sequence_costs_what_its_conversations_cost_alone(trainer):
    loader = trainer.data.train
    documents = loader.order.sequence(0, 0)
    assert len(documents) >= 2, "the first sequence packs several conversations"
    parts = []
    for shard, document, tokens in documents:
        shard = loader._shard(int(shard))
        parts.append(
            (
                shard.decode(int(document), loader.manifest.numpy_dtype, loader._decompressor)[:tokens],
                shard.decode_mask(int(document), loader._decompressor)[:tokens],
            )
        )
    width = loader.seq_len + 1

    def rows(groups):
        windows = np.full((len(groups), width), loader.eod, dtype=np.int64)
        valid, trained = np.zeros(windows.shape, dtype=bool), np.zeros(windows.shape, dtype=bool)
        for row, group in enumerate(groups):
            tokens = np.concatenate([t for t, _ in group])
            windows[row, : len(tokens)], valid[row, : len(tokens)] = tokens, True
            trained[row, : len(tokens)] = np.concatenate([m for _, m in group])
        return [torch.from_numpy(a) for a in (windows, valid, trained)]

    packed = masked_micro_batch(*rows([parts]), loader.eod, keep_apart=True)
    alone = masked_micro_batch(*rows([[part] for part in parts]), loader.eod, keep_apart=False)
    assert packed["loss_mask"].sum() == alone["loss_mask"].sum() > 0
    with torch.no_grad():
        packed_loss = (_forward(trainer.model, packed) * packed["loss_mask"]).sum()
        alone_loss = (_forward(trainer.model, alone) * alone["loss_mask"]).sum()
        crossing = dict(packed)
        del crossing["document_ids"]
        crossing["position_ids"] = torch.arange(loader.seq_len).expand(1, -1)
        crossing_loss = (_forward(trainer.model, crossing) * packed["loss_mask"]).sum()
    assert abs(packed_loss - alone_loss) <= 1e-5 * abs(alone_loss)
    assert abs(crossing_loss - alone_loss) > 1e-4 * abs(alone_loss), "attending across conversations differs"
