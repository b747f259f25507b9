"""Token-capped micro-batches with gradient accumulation (`optim.max_tokens_per_forward`): the same
gradients as one forward of the whole batch, and activation memory of one micro-batch, not of the
batch. Tiny random BERT on the synthetic K=4 data, CPU."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from rmcore.batching import Encoder, encode_groups, group_micro_batches
from rmcore.config import RunConfig
from rmcore.model import RewardModel, load_tokenizer
from rmcore.train import TrainLoop, WorkerContext, split_rows, train_reward_model

BUDGET = 512  # tokens a micro-batch: a 48-pair step of the synthetic data splits into several


def make_loop(backbone, data, **optim) -> TrainLoop:
    # the scalar head: its init (std 1/sqrt(hidden)) gives gradients the tolerances below are set for;
    # BERT's own classifier starts at std 0.02, every reward ~0 and every gradient ~1e-5, where fp32
    # rounding (~1e-9, measured; the loop is the same for both heads) exceeds them
    cfg = RunConfig.model_validate({"model": {"backbone": str(backbone), "max_length": 128, "head": "scalar"},
                                    "optim": {"pairs_per_step": 48, **optim}, "device": "cpu"})
    tok = load_tokenizer(str(backbone))
    encoder = Encoder(tok, 128)
    torch.manual_seed(0)
    model = RewardModel.from_backbone(cfg.model, tok.pad_token_id)
    val_rows = split_rows(data, "validation")
    return TrainLoop(cfg, model, model, encode_groups(split_rows(data, "train"), encoder), (val_rows, encode_groups(val_rows, encoder)),
                     tok.pad_token_id, WorkerContext(show_progress=False), packing=False)


def gradients(loop: TrainLoop, batch: list[int], max_tokens: int) -> tuple[float, dict[str, torch.Tensor]]:
    loop.opt.zero_grad(set_to_none=True)
    loop.max_tokens = max_tokens
    loss = loop._accumulate(batch, True, sync=True)
    return loss, {n: p.grad.clone() for n, p in loop.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", [{"name": "bt"}, {"name": "kwise", "center_rewards": 0.1}, {"name": "plackett_luce"},
                                  {"name": "margin", "label_smoothing": 0.1}])
def test_micro_batch_gradients_equal_the_whole_batch(tiny_bert, synthetic_dataset, loss):
    loop = make_loop(tiny_bert, synthetic_dataset)
    loop.cfg = loop.cfg.model_copy(update={"loss": loop.cfg.loss.model_copy(update=loss)})
    batch, _ = loop.plan.steps(0)[0]
    assert len(group_micro_batches([loop.train_groups[i] for i in batch], BUDGET)) >= 3
    whole_loss, whole = gradients(loop, batch, 0)
    parts_loss, parts = gradients(loop, batch, BUDGET)
    assert parts_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole.keys() == parts.keys() and len(whole) > 10
    scale = max(g.abs().max().item() for g in whole.values())  # gradients that are 0 in theory differ by rounding
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_micro_batches_keep_whole_groups_under_the_budget(tiny_bert, synthetic_dataset):
    loop = make_loop(tiny_bert, synthetic_dataset)
    groups = [loop.train_groups[i] for i in loop.plan.steps(0)[0][0]]
    parts = group_micro_batches(groups, BUDGET)
    assert sorted(g for p in parts for g in p) == list(range(len(groups)))
    for p in parts:
        padded = sum(len(groups[g].seqs) for g in p) * max(groups[g].max_len for g in p)
        assert padded <= BUDGET or len(p) == 1
    assert group_micro_batches(groups, 0) == [sorted(range(len(groups)), key=lambda g: groups[g].max_len)]


class SavedActivations:
    """The peak bytes of tensors autograd holds for backward (parameters excluded) while installed:
    what a step's activation memory is, device or not."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage → [bytes, references]
        self.now = self.peak = 0
        self.params: set[int] = set()

    def watch(self, module: torch.nn.Module) -> None:
        self.params |= {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.params or not key:
            return t
        if key not in self.live:
            self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.now += self.live[key][0]
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        held = _Held(t.detach())  # not `t`: a saved output would hold its own grad_fn, a cycle gc cannot see
        weakref.finalize(held, self._release, key)
        return held

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if not entry[1]:
            self.now -= entry[0]
            del self.live[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda h: h.t if isinstance(h, _Held) else h)


class _Held:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def peak_training_activations(backbone, data, monkeypatch, max_tokens: int, **model) -> int:
    """Trains three steps of 48 pairs through `train_reward_model` with the hooks installed."""
    saved = SavedActivations()
    original = RewardModel.from_backbone.__func__

    def watched(cls, *a, **kw):
        m = original(cls, *a, **kw)
        saved.watch(m)
        return m

    with monkeypatch.context() as mp:
        mp.setattr(RewardModel, "from_backbone", classmethod(watched))
        cfg = RunConfig.model_validate({"model": {"backbone": str(backbone), "max_length": 128, **model}, "device": "cpu",
                                        "optim": {"pairs_per_step": 48, "epochs": 0.1, "max_tokens_per_forward": max_tokens}})
        with saved.hooks():
            summary = train_reward_model(cfg, data, None, WorkerContext(show_progress=False))
    gc.collect()
    assert summary["steps"] >= 3 and saved.now == 0, saved.now
    return saved.peak


def test_activation_memory_is_one_micro_batch_not_the_step(tiny_bert, synthetic_dataset, monkeypatch):
    """All of a step's forward chunks used to stay in one autograd graph until the step's single
    backward: the token budget cut forwards, not memory. Now each micro-batch is backward'ed before
    the next forward: the peak of saved activations is about one micro-batch's (a step here has 4+),
    well under a whole step's (one forward, no budget)."""
    whole = peak_training_activations(tiny_bert, synthetic_dataset, monkeypatch, 0)
    capped = peak_training_activations(tiny_bert, synthetic_dataset, monkeypatch, BUDGET)
    assert capped < 0.5 * whole, (capped, whole)
    # activation checkpointing on top: only the blocks' inputs are kept
    checkpointed = peak_training_activations(tiny_bert, synthetic_dataset, monkeypatch, BUDGET, gradient_checkpointing=True)
    assert checkpointed < 0.6 * capped, (checkpointed, capped)
