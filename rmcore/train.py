"""The training loop: plain torch, used in-process and inside Ray Train workers alike.

What differs between the two is injected through `WorkerContext` (rank, device, DDP wrapping,
checkpoint and metric hooks, resume state), so there is one loop to test.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rmcore.batching import EncodedGroup, Encoder, collate, encode_groups, group_micro_batches, plan_batches, uses_chat_template
from rmcore.config import RunConfig, SelectBy
from rmcore.dataset import load_groups, read_manifest
from rmcore.inference import resolve_device, score_sequences
from rmcore.losses import compute_loss
from rmcore.metrics import evaluate_rewards, scalar_metrics
from rmcore.model import RewardModel, load_tokenizer, resolve_backbone
from rmcore.parallel import full_model_state, full_state, is_sharded, load_full_state


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # wraps the model for the workers (DDP, FSDP2) and places it on `device`; it is given the model on
    # the CPU, so that FSDP shards before anything reaches the device (None: moved there whole)
    prepare_model: Callable[[nn.Module], nn.Module] | None = None
    save_checkpoint: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
    report: Callable[[dict[str, Any]], None] | None = None
    resume: dict[str, Any] | None = None
    show_progress: bool = True
    checkpoint_at_eval: bool = False  # also checkpoint at every evaluation (Tune trials: each report resumable)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def score_groups(model: nn.Module, groups: list[EncodedGroup], pad_id: int, device: torch.device, max_tokens: int,
                 packing: bool = False) -> np.ndarray:
    """One reward per completion of `groups`, in order (eval mode; training mode is restored)."""
    was_training = model.training
    model.eval()
    rewards = []
    for start in range(0, len(groups), 64):
        seqs = [s for g in groups[start:start + 64] for s in g.seqs]
        rewards.append(score_sequences(model, seqs, pad_id, device, max_tokens, packing=packing).cpu().numpy())
    model.train(was_training)
    return np.concatenate(rewards) if rewards else np.zeros(0)


def resolve_packing(setting: str, model: RewardModel, device: torch.device) -> bool:
    """`optim.packing` for this model on this device; `on` for a model that cannot pack is an error."""
    reason = model.packing_unsupported()
    if setting == "on" and reason:
        raise ValueError(f"optim.packing=on: {reason}; use packing off or auto")
    return reason is None and (setting == "on" or (setting == "auto" and device.type == "cuda"))


def split_rows(data_dir: Path, split: str) -> list[dict[str, Any]]:
    return load_groups(data_dir)[split].to_list()


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def build_scheduler(opt: torch.optim.Optimizer, cfg: RunConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(cfg.optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.optim.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 if cfg.optim.schedule == "constant" else max(0.0, 1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class ShardedPlan:
    """The epoch's batch plan, with whole batches dealt round-robin to workers. Every worker runs
    the same number of steps (DDP needs matching collectives); a worker short of one repeats a
    batch with zero loss weight, which trains nothing and is not counted."""

    def __init__(self, groups: list[EncodedGroup], micro_pairs: int, seed: int, rank: int, world: int) -> None:
        self.groups, self.micro_pairs, self.seed, self.rank, self.world = groups, micro_pairs, seed, rank, world

    def steps(self, epoch: int) -> list[tuple[list[int], bool]]:
        plan = plan_batches(self.groups, self.micro_pairs, self.seed, epoch)
        per_worker = math.ceil(len(plan) / self.world)
        mine = plan[self.rank::self.world]
        return [(b, True) for b in mine] + [(mine[0] if mine else plan[0], False)] * (per_worker - len(mine))


def train_reward_model(cfg: RunConfig, data_dir: Path, out_dir: Path | None, ctx: WorkerContext | None = None) -> dict[str, Any]:
    """Trains one reward model on `data_dir` and (rank 0) saves it to `out_dir`; returns the summary."""
    ctx = ctx or WorkerContext(device=resolve_device(cfg.device))
    seed_everything(cfg.optim.seed)
    tokenizer = load_tokenizer(resolve_backbone(cfg.model.backbone))
    encoder = Encoder(tokenizer, cfg.model.max_length, chat=uses_chat_template(cfg.model.chat_template, tokenizer))
    train_groups = encode_groups(split_rows(data_dir, "train"), encoder, cfg.loss.label_smoothing)
    val_rows = split_rows(data_dir, "validation")
    val_groups = encode_groups(val_rows, encoder)
    if not any(g.num_pairs for g in train_groups):
        raise ValueError(f"{data_dir}: the train split holds no strict preference pairs")
    model = RewardModel.from_backbone(cfg.model, tokenizer.pad_token_id)  # on the CPU
    packing = resolve_packing(cfg.optim.packing, model, ctx.device)
    wrapped = ctx.prepare_model(model) if ctx.prepare_model else model.to(ctx.device)
    loop = TrainLoop(cfg, wrapped, model, train_groups, (val_rows, val_groups), tokenizer.pad_token_id, ctx, packing)
    summary = loop.run() | {"packing": packing}
    summary["dataset_version"] = read_manifest(data_dir)["version"]
    full = loop.saved_state()  # every rank: a collective when sharded
    if out_dir is not None and ctx.rank == 0:
        model.save_pretrained(out_dir, tokenizer, state_dict=full)
        summary["model_dir"] = str(out_dir)
    return summary


class TrainLoop:
    """One run of training: `run()` the whole of it (what `train_reward_model` does), or `step()` one
    optimiser step over given planned batches (benchmarks, tests). `wrapped` is the model as the workers
    run it (DDP, FSDP2, or `model` itself); `validation` is (rows, encoded groups)."""

    def __init__(self, cfg: RunConfig, wrapped: nn.Module, model: RewardModel, train_groups: list[EncodedGroup],
                 validation: tuple[list[dict[str, Any]], list[EncodedGroup]], pad_id: int, ctx: WorkerContext,
                 packing: bool) -> None:
        self.cfg, self.wrapped, self.model, self.ctx, self.packing = cfg, wrapped, model, ctx, packing
        self.train_groups, self.pad_id = train_groups, pad_id
        self.val_rows, self.val_groups = validation
        micro_pairs = max(1, math.ceil(cfg.optim.pairs_per_step / (cfg.optim.grad_accum * ctx.world_size)))
        self.max_tokens = cfg.optim.max_tokens_per_forward
        self.plan = ShardedPlan(train_groups, micro_pairs, cfg.optim.seed, ctx.rank, ctx.world_size)
        self.micro_per_epoch = len(self.plan.steps(0))
        self.total_micro = max(1, math.ceil(cfg.optim.epochs * self.micro_per_epoch))
        self.total_steps = math.ceil(self.total_micro / cfg.optim.grad_accum)
        self.opt = build_optimizer(model, cfg)
        self.sched = build_scheduler(self.opt, cfg, self.total_steps)
        self.micro = self.resumed_from = 0
        self.trained = np.zeros(len(train_groups), dtype=np.int64)
        self.history: list[dict[str, Any]] = []
        self.best = _Best(cfg, self.total_steps, any(g.num_pairs for g in self.val_groups))
        if ctx.resume:
            self._restore(ctx.resume)

    def _restore(self, state: dict[str, Any]) -> None:
        load_full_state(self.model, self.opt, state["model"], state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.micro = self.resumed_from = state["micro"]
        self.trained = np.asarray(state["trained"], dtype=np.int64)
        torch.set_rng_state(state["rng"])
        self.best.restore(state.get("best"))

    def state(self) -> dict[str, Any]:
        """The resumable state (every rank calls it: a collective when sharded; rank 0 holds the tensors)."""
        model, optimizer = full_state(self.model, self.opt)
        return {
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.sched.state_dict(),
            "micro": self.micro,
            "trained": self.trained.tolist(),
            "rng": torch.get_rng_state(),
            "best": self.best.checkpoint(),
        }

    def _micro_batches(self):
        """(epoch, position) → batch, from `self.micro` on, so a resumed run continues in place."""
        while self.micro < self.total_micro and self.best.stopped_at is None:
            epoch, pos = divmod(self.micro, self.micro_per_epoch)
            steps = self.plan.steps(epoch)
            for batch, counts in steps[pos:]:
                if self.micro >= self.total_micro or self.best.stopped_at is not None:  # early stopping
                    return
                yield batch, counts

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        pairs_this_run = 0
        started = time.perf_counter()
        progress = _progress(ctx.show_progress and ctx.rank == 0, self.total_micro, self.micro)
        self.wrapped.train()
        for batch_groups, counts in self._micro_batches():
            steps_next = (self.micro + 1) % cfg.optim.grad_accum == 0 or self.micro + 1 == self.total_micro
            loss = self._accumulate(batch_groups, counts, sync=steps_next)
            if counts:
                pairs_this_run += sum(self.train_groups[i].num_pairs for i in batch_groups)
                self.trained[batch_groups] += 1
            self.micro += 1
            progress.advance(loss)
            if self.micro % cfg.optim.grad_accum == 0 or self.micro == self.total_micro:
                self._optimizer_step()
                self._after_step()
        progress.close()
        train_s = time.perf_counter() - started
        final = self._select_final()
        pairs = np.array([g.num_pairs for g in self.train_groups])
        truncated = np.array([g.truncated_pairs for g in self.train_groups])
        return {
            "pairs_trained": int((self.trained * pairs).sum()),
            "pairs_truncated": int((self.trained * truncated).sum()),
            "train_s": round(train_s, 3),  # this attempt's: a resumed run's earlier attempts are not in it
            "pairs_this_attempt": pairs_this_run,
            "pairs_per_s": round(pairs_this_run / train_s, 3) if train_s else 0.0,
            "steps": self.total_steps,
            "steps_run": self._step(),
            "eval_every": self.best.every,
            "best_step": self.best.step,  # the step whose weights were saved (None: the last, no selection)
            "best_val_accuracy": self.best.metrics["accuracy"] if self.best.metrics else None,
            "best_val_loss": self.best.metrics["loss"] if self.best.metrics else None,
            "stopped_early_at": self.best.stopped_at,
            "val_accuracy": final["accuracy"],
            "val_loss": final["loss"],
            "val_ece": final["ece"],
            "val_margin_mean": final["margin_mean"],
            "val_pairs": final["n"],
            "group_train_counts": self.trained.tolist(),
            "resumed_from_step": math.ceil(self.resumed_from / cfg.optim.grad_accum),
            "history": self.history,
        }

    def step(self, batches: list[list[int]]) -> float:
        """One optimiser step over `batches` (planned batches of `train_groups` indices, e.g. from
        `self.plan.steps(epoch)`; at most `optim.grad_accum` of them), each run as `run()` runs it:
        token-capped micro-batches, forward and backward, the gradients all-reduced once under DDP;
        then clipping, the optimiser and the scheduler. Each batch's loss weighs 1/`optim.grad_accum`, as
        in `run()`. The run's position and accounting do not move. Returns the batches' mean loss."""
        if not 1 <= len(batches) <= self.cfg.optim.grad_accum:
            raise ValueError(f"a step takes 1 to optim.grad_accum={self.cfg.optim.grad_accum} batches, not {len(batches)}")
        losses = [self._accumulate(b, True, sync=n == len(batches) - 1) for n, b in enumerate(batches)]
        self._optimizer_step()
        return sum(losses) / len(losses)

    def _accumulate(self, batch_groups: list[int], counts: bool, sync: bool) -> float:
        """Forward and backward of one planned batch in micro-batches of whole prompt groups of at most
        `max_tokens_per_forward` padded tokens, each backward'ed before the next forward, so activation
        memory is one micro-batch's, not the batch's. Each micro-batch's loss is its share of the batch's
        (its sums over the batch's normalisers): the gradients are those of the whole batch at once.
        Every rank runs as many micro-batches (a rank short of them repeats its smallest with zero
        weight): one forward and one backward each, so FSDP's gathers and reductions match across
        ranks; under DDP only the last backward before an optimiser step (`sync`) all-reduces.
        Returns the batch's loss (0 for a zero-weight batch)."""
        cfg, device = self.cfg, self.ctx.device
        groups = [self.train_groups[i] for i in batch_groups]
        whole = collate(groups).index
        parts = [(part, counts) for part in group_micro_batches(groups, self.max_tokens)]
        parts += [(min(parts, key=lambda p: sum(groups[g].tokens for g in p[0]))[0], False)] * (self._most_parts(len(parts)) - len(parts))
        total = torch.zeros((), device=device)
        for n, (part, weight) in enumerate(parts):
            batch = collate([groups[g] for g in part])
            no_sync = getattr(self.wrapped, "no_sync", None)  # DDP's
            with no_sync() if no_sync and not (sync and n == len(parts) - 1) else nullcontext():
                rewards = score_sequences(self.wrapped, batch.seqs, self.pad_id, device, 0, cfg.model.dtype, self.packing)
                loss = compute_loss(rewards, batch.index.to(device), cfg.loss, part_of=whole) / cfg.optim.grad_accum
                (loss if weight else loss * 0.0).backward()
            if weight:
                total += loss.detach()
        return total.item() * cfg.optim.grad_accum  # one device sync per batch

    def _most_parts(self, mine: int) -> int:
        """The most micro-batches any rank has for this batch (a collective when distributed)."""
        if self.ctx.world_size == 1 or not dist.is_initialized():
            return mine
        most = torch.tensor([mine], device=self.ctx.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item())

    def _optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.cfg.optim.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def _step(self) -> int:
        return math.ceil(self.micro / self.cfg.optim.grad_accum)

    def _after_step(self) -> None:
        step, every_ckpt = self._step(), self.cfg.scale.checkpoint_every
        metrics: dict[str, Any] = {"step": step, "epoch": round(self.micro / self.micro_per_epoch, 4), "lr": self.sched.get_last_lr()[0]}
        evaluated = bool(self.best.every) and step % self.best.every == 0 and step < self.total_steps
        if evaluated:
            result = self._evaluate()
            metrics |= {f"val_{k}": v for k, v in result.items()}
            self.history.append(metrics)
            self.best.consider(step, result, self._weights)
        checkpoint = bool(self.ctx.save_checkpoint) and step < self.total_steps and (
            (every_ckpt and step % every_ckpt == 0) or (evaluated and self.ctx.checkpoint_at_eval))
        if checkpoint:
            self.ctx.save_checkpoint(self.state(), metrics)  # reports the metrics with the checkpoint: one report a step
        elif evaluated and self.ctx.report:
            self.ctx.report(metrics)

    def _weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the full weights (every rank calls: a collective when sharded; rank 0 holds them)."""
        full = full_model_state(self.model)
        if full is not None:
            return full
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def _select_final(self) -> dict[str, Any]:
        """The validation metrics of the state to save: the final state when it scores strictly higher than
        every evaluated one, else the best (its weights are loaded back; sharded, rank 0 saves them from
        `saved_state`)."""
        step = self._step()
        final = self.best.last[1] if self.best.last and self.best.last[0] == step else self._evaluate()
        best = self.best
        if (not best.on or best.metrics is None or best.step == step
                or selection_rank(final, best.by) > selection_rank(best.metrics, best.by)):
            self.best.keep_final(step, final)
            return final
        if not is_sharded(self.model):
            self.model.load_state_dict({k: v.to(self.ctx.device) for k, v in self.best.weights.items()})
        self.best.selected_earlier = True
        return self.best.metrics

    def saved_state(self) -> dict[str, Any] | None:
        """The full state dict to save (sharded), None when the module's own weights are the ones to save."""
        if self.best.selected_earlier and is_sharded(self.model):
            return self.best.weights
        return full_model_state(self.model)

    def _evaluate(self) -> dict[str, Any]:
        rewards = score_groups(self.model, self.val_groups, self.pad_id, self.ctx.device, self.cfg.optim.max_tokens_per_forward,
                               self.packing)
        evaluation = evaluate_rewards(self.val_rows, rewards)
        diffs = evaluation.diffs
        # the Bradley-Terry loss on the validation pairs: what `select_by=loss` ranks states by (else the
        # tie-break between equally accurate states)
        loss = float(np.logaddexp(0.0, -diffs).mean()) if len(diffs) else float("nan")
        return scalar_metrics(evaluation.metrics) | {"loss": loss}


EVALS_PER_RUN = 4  # eval_every = 0 with select_best: evaluations a run, the last at the end (each ~4.5% of a 1-epoch run on hh-rlhf, bench/RESULTS.md)


class _Best:
    """Best-state selection and early stopping over one run's evaluations, ranked by `optim.select_by`;
    training stops after `patience` evaluations in a row without a better state."""

    def __init__(self, cfg: RunConfig, total_steps: int, has_validation: bool) -> None:
        self.on = cfg.optim.select_best and has_validation
        self.by = cfg.optim.select_by
        self.every = cfg.optim.eval_every or (math.ceil(total_steps / EVALS_PER_RUN) if self.on else 0)
        self.patience = cfg.optim.early_stopping_patience if self.on else 0
        self.step: int | None = None
        self.metrics: dict[str, Any] | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        self.since = 0
        self.stopped_at: int | None = None
        self.last: tuple[int, dict[str, Any]] | None = None
        self.selected_earlier = False

    def consider(self, step: int, metrics: dict[str, Any], weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.last = (step, metrics)
        if not self.on:
            return
        if self.metrics is None or selection_rank(metrics, self.by) > selection_rank(self.metrics, self.by):
            self.step, self.metrics, self.weights, self.since = step, metrics, weights(), 0
            return
        self.since += 1
        if self.patience and self.since >= self.patience:
            self.stopped_at = step

    def keep_final(self, step: int, metrics: dict[str, Any]) -> None:
        """The final state is saved: it is the selected one."""
        if self.on:
            self.step, self.metrics, self.weights = step, metrics, None

    def checkpoint(self) -> dict[str, Any] | None:
        if self.metrics is None:
            return None
        return {"step": self.step, "metrics": self.metrics, "weights": self.weights or {}, "since": self.since,
                "stopped_at": self.stopped_at}

    def restore(self, saved: dict[str, Any] | None) -> None:
        if saved:
            self.step, self.metrics = saved["step"], saved["metrics"]
            self.weights = {k: v.cpu() for k, v in saved["weights"].items()}
            self.since, self.stopped_at = saved["since"], saved["stopped_at"]


# what a sweep compares trials by, for each `optim.select_by`: the reported metric and its direction
SELECT_METRIC: dict[SelectBy, tuple[str, Literal["max", "min"]]] = {"accuracy": ("val_accuracy", "max"), "loss": ("val_loss", "min")}


def selection_rank(metrics: dict[str, Any], by: SelectBy) -> tuple[float, float]:
    """How `optim.select_by` ranks a state's validation `metrics` (accuracy, loss), higher is better:
    (accuracy, -loss) or, selecting by loss, (-loss, accuracy); NaN ranks lowest."""
    accuracy = -math.inf if metrics["accuracy"] is None or math.isnan(metrics["accuracy"]) else metrics["accuracy"]
    neg_loss = -math.inf if metrics["loss"] is None or math.isnan(metrics["loss"]) else -metrics["loss"]
    return (neg_loss, accuracy) if by == "loss" else (accuracy, neg_loss)


class _progress:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task("train", total=total, completed=done, loss=float("nan"))
            self.bar.start()

    def advance(self, loss: float) -> None:
        if self.bar:
            self.bar.update(self.task, advance=1, loss=loss)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
