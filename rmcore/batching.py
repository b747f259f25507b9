"""Groups → token ids → batches.

Each prompt group is encoded once: the prompt is tokenised once and every *unique* completion text
becomes one sequence, so a K-wise group costs K sequences, not 2·C(K,2). Over-long inputs keep
the response and lose the start of the prompt (truncated from the left; whole early turns first
under a chat template); nothing is dropped.

With a chat template (an instruct backbone), (prompt, response) is the conversation the template
renders: the prompt's turns (conversations are stored in the hh-rlhf layout "\n\nHuman: …\n\n
Assistant: …", which every rmflow converter writes) plus the response as the assistant's turn —
the ids `tokenizer.apply_chat_template(messages)` gives, as TRL and RL trainers build them.

Batches keep whole groups (a prompt's comparisons are never split) and are bucketed by length
inside shuffled windows, which keeps padding low without giving up a random order.
"""
from __future__ import annotations

import random
import re
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rmcore.losses import PairIndex

TURN = re.compile(r"\n\n(Human|Assistant|System): ?")
ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}
BUCKET_WINDOW = 50  # batches per length-sorted window: large enough to bucket, small enough to stay random


@dataclass
class EncodedGroup:
    index: int
    seqs: list[list[int]]
    pairs: list[tuple[int, int]]
    margins: list[float]
    weights: list[float]
    strengths: list[float]
    smoothing: list[float]
    rank: list[int]
    blocks: list[int]
    ties: list[tuple[int, int]] = field(default_factory=list)
    truncated_pairs: int = 0
    truncated_seqs: int = 0

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    @property
    def max_len(self) -> int:
        return max(len(s) for s in self.seqs)


@dataclass
class Encoder:
    """Builds model inputs the tokenizer's way: the chat template's rendering when `chat`, else
    [CLS] prompt [SEP] response [SEP] for encoders with a separator, prompt + response + eos for
    decoders (last-token pooling lands on eos)."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    chat: bool = False
    _template: tuple[list[int], list[int], list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self._template = self._pair_template()
        self.n_special = sum(len(part) for part in self._template)

    def _pair_template(self) -> tuple[list[int], list[int], list[int]]:
        """(prefix, middle, suffix) around prompt and response, read off the tokenizer's own
        pair encoding of two probe words; decoders without a separator get bos … eos."""
        tok = self.tokenizer
        if tok.sep_token is None:
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            return bos, [], eos
        a, b = (tok("x", add_special_tokens=False)["input_ids"], tok("y", add_special_tokens=False)["input_ids"])
        full = tok("x", "y", add_special_tokens=True)["input_ids"]
        i = next(k for k in range(len(full)) if full[k:k + len(a)] == a)
        j = next(k for k in range(i + len(a), len(full)) if full[k:k + len(b)] == b)
        return full[:i], full[i + len(a):j], full[j + len(b):]

    def _join(self, p: list[int], r: list[int]) -> list[int]:
        prefix, middle, suffix = self._template
        return prefix + p + middle + r + suffix

    def join(self, prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], bool]:
        """Returns (input ids, truncated). Keeps the response; cuts the prompt from the left. A
        response that alone overflows keeps its start and a quarter of the budget for the prompt."""
        budget = self.max_length - self.n_special
        if len(prompt_ids) + len(response_ids) <= budget:
            return self._join(prompt_ids, response_ids), False
        if len(response_ids) > budget - min(len(prompt_ids), budget // 4):
            keep_prompt = min(len(prompt_ids), budget // 4)
            response_ids = response_ids[: budget - keep_prompt]
        else:
            keep_prompt = budget - len(response_ids)
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:] if keep_prompt else []
        return self._join(prompt_ids, response_ids), True

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def encode(self, prompts: list[str], responses: list[str]) -> list[tuple[list[int], bool]]:
        """(input ids, truncated) for each (prompt, response)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if self.chat:
            return [self.encode_chat(p, r) for p, r in zip(prompts, responses)]
        return [self.join(p, r) for p, r in zip(self.tokenize(list(prompts)), self.tokenize(list(responses)))]

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def encode_chat(self, prompt: str, response: str) -> tuple[list[int], bool]:
        """The conversation's ids; when too long, whole early turns go first (a system message
        stays; the kept part starts with a user turn); a last turn that alone overflows keeps its
        end, where the reward is read."""
        messages = to_messages(prompt)
        answer = [{"role": "assistant", "content": response}]
        ids = self.render(messages + answer)
        cut = False
        while len(ids) > self.max_length:
            system = messages[:1] if messages and messages[0]["role"] == "system" else []
            turns = messages[len(system):]
            if len(turns) <= 1:
                return ids[-self.max_length:], True
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":
                turns = turns[1:]
            messages, cut = system + turns, True
            ids = self.render(messages + answer)
        return ids, cut

    def encode_text(self, text: str) -> list[int]:
        """A whole, already formatted query (prompt and response together, as OpenRLHF's remote
        RM sends it): its ids as they are under a chat template (the text carries it), else
        wrapped like a response with an empty prompt; the end is kept when too long."""
        ids = self.tokenize([text])[0]
        if not self.chat:
            prefix, _, suffix = self._template
            ids = prefix + ids[: max(0, self.max_length - len(prefix) - len(suffix))] + suffix
        return ids[-self.max_length:]


def to_messages(prompt: str) -> list[dict[str, str]]:
    """A prompt as chat messages: a conversation in the hh-rlhf layout split into its turns (the
    trailing empty "Assistant:", the turn being answered, dropped); any other text is one user turn."""
    parts = TURN.split(prompt)
    if len(parts) < 3:
        return [{"role": "user", "content": prompt}]
    messages = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    messages += [{"role": ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages.pop()
    return messages or [{"role": "user", "content": ""}]


def uses_chat_template(setting: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether (prompt, response) is encoded with the tokenizer's chat template."""
    return setting == "auto" and bool(getattr(tokenizer, "chat_template", None))


def encode_groups(rows: list[dict[str, Any]], encoder: Encoder, default_smoothing: float = 0.0) -> list[EncodedGroup]:
    """Rows of the `groups` dataset → EncodedGroups. Optional per-pair columns `strengths` and
    `smoothing` come from the preference-strength ensemble."""
    uniq_per_row = [list(dict.fromkeys(r["completions"])) for r in rows]
    if encoder.chat:
        encoded = iter(encoder.encode_chat(r["prompt"], t) for r, u in zip(rows, uniq_per_row) for t in u)
    else:
        prompt_ids = encoder.tokenize([r["prompt"] for r in rows])
        comp_ids = iter(encoder.tokenize([t for u in uniq_per_row for t in u]))
        encoded = iter(encoder.join(p, next(comp_ids)) for p, u in zip(prompt_ids, uniq_per_row) for _ in u)
    out = []
    for n, (row, uniq) in enumerate(zip(rows, uniq_per_row)):
        seq_of_text = {t: k for k, t in enumerate(uniq)}
        seqs, trunc = [], []
        for _ in uniq:
            ids, was_cut = next(encoded)
            seqs.append(ids)
            trunc.append(was_cut)
        to_seq = [seq_of_text[t] for t in row["completions"]]
        pairs = [(to_seq[w], to_seq[l]) for w, l in row["pairs"]]
        npairs = len(pairs)
        strengths = list(row.get("strengths") or [0.0] * npairs)
        smoothing = list(row.get("smoothing") or [default_smoothing] * npairs)
        out.append(
            EncodedGroup(
                index=n,
                seqs=seqs,
                pairs=pairs,
                margins=list(row["margins"]),
                weights=list(row.get("weights") or [1.0] * npairs),
                strengths=strengths,
                smoothing=smoothing,
                rank=to_seq,
                blocks=list(row["blocks"]),
                ties=[(to_seq[a], to_seq[b]) for a, b in row["ties"]],
                truncated_pairs=sum(1 for w, l in pairs if trunc[w] or trunc[l]),
                truncated_seqs=sum(trunc),
            )
        )
    return out


def plan_batches(
    groups: list[EncodedGroup], pairs_per_step: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """Group indices per step. Shuffled, then length-sorted within windows of BUCKET_WINDOW
    batches, cut at `pairs_per_step` strict pairs, then the batch order is shuffled again."""
    order = list(range(len(groups)))
    rng = random.Random(f"{seed}:{epoch}")
    if shuffle:
        rng.shuffle(order)
    avg_pairs = max(1.0, sum(g.num_pairs for g in groups) / max(len(groups), 1))
    window = max(1, int(BUCKET_WINDOW * pairs_per_step / avg_pairs))
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: groups[i].max_len)
        current: list[int] = []
        pairs = 0
        for i in chunk:
            current.append(i)
            pairs += groups[i].num_pairs
            if pairs >= pairs_per_step:
                batches.append(current)
                current, pairs = [], 0
        if current:
            batches.append(current)
    # a batch of tie-only groups holds no strict pair for any pairwise loss to learn from
    batches = [b for b in batches if any(groups[i].num_pairs for i in b)]
    if shuffle:
        rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    seqs: list[list[int]]
    index: PairIndex
    num_pairs: int


def collate(groups: list[EncodedGroup]) -> Batch:
    """Concatenates groups into one sequence list and index tensors into it."""
    seqs: list[list[int]] = []
    cols: dict[str, list] = {k: [] for k in ("chosen", "rejected", "margin", "weight", "strength", "smoothing", "group")}
    kmax = max(len(g.rank) for g in groups)
    rank_seq = torch.full((len(groups), kmax), -1, dtype=torch.long)
    rank_block = torch.full((len(groups), kmax), -1, dtype=torch.long)
    for gi, g in enumerate(groups):
        base = len(seqs)
        seqs.extend(g.seqs)
        cols["chosen"] += [base + w for w, _ in g.pairs]
        cols["rejected"] += [base + l for _, l in g.pairs]
        cols["margin"] += g.margins
        cols["weight"] += g.weights
        cols["strength"] += g.strengths
        cols["smoothing"] += g.smoothing
        cols["group"] += [gi] * g.num_pairs
        rank_seq[gi, : len(g.rank)] = torch.tensor([base + s for s in g.rank])
        rank_block[gi, : len(g.blocks)] = torch.tensor(g.blocks)
    longs = {"chosen", "rejected", "group"}
    index = PairIndex(
        **{k: torch.tensor(v, dtype=torch.long if k in longs else torch.float32) for k, v in cols.items()},
        rank_seq=rank_seq,
        rank_block=rank_block,
    )
    return Batch(seqs, index, len(cols["chosen"]))


def group_micro_batches(groups: list[EncodedGroup], max_tokens: int) -> list[list[int]]:
    """Positions into `groups`, cut into micro-batches of whole groups (a K-wise loss couples a
    prompt's completions), length-sorted so that each micro-batch's sequences, padded to its longest,
    are at most `max_tokens` tokens; a group over the budget alone is a micro-batch of its own
    (0 = one micro-batch). Training runs each one's forward and backward before the next forward."""
    parts: list[list[int]] = [[]]
    seqs = 0
    for g in sorted(range(len(groups)), key=lambda g: groups[g].max_len):
        n = len(groups[g].seqs)
        if max_tokens and parts[-1] and (seqs + n) * groups[g].max_len > max_tokens:  # the longest so far, since sorted
            parts.append([])
            seqs = 0
        parts[-1].append(g)
        seqs += n
    return parts


def length_chunks(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, length-sorted and cut so that each chunk padded to its longest is at
    most `max_tokens` tokens (0 = one chunk)."""
    chunks: list[list[int]] = [[]]
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        width = lengths[i]  # the longest so far, since sorted
        if max_tokens and chunks[-1] and (len(chunks[-1]) + 1) * width > max_tokens:
            chunks.append([])
        chunks[-1].append(i)
    return chunks


def pad_chunks(seqs: list[list[int]], pad_id: int, max_tokens: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Length-sorted forward chunks of (original positions, input_ids, attention_mask), each at
    most `max_tokens` padded tokens (0 = one chunk). Sorting first keeps padding per chunk small."""
    out = []
    for members in length_chunks([len(s) for s in seqs], max_tokens):
        width = max(len(seqs[i]) for i in members)
        ids = torch.full((len(members), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for row, i in enumerate(members):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, : len(seqs[i])] = 1
        out.append((members, ids, mask))
    return out


def pack_chunks(seqs: list[list[int]], pad_id: int, max_tokens: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Padding-free forward chunks of (original positions, input_ids (R, W), position_ids (R, W),
    each member's last token as a flat index into R·W).

    Starts from `pad_chunks`' layout (length-sorted chunks of at most `max_tokens` tokens, one
    sequence a row, each chunk as wide as its longest) and moves sequences, shortest first, into
    the padding at the end of other rows (the smallest gap they fit), so their own rows are not
    computed at all. Position ids restart at 0 for every sequence, from which transformers keeps
    attention inside each one (a block-diagonal mask for SDPA, varlen for FlashAttention), so no
    token attends across a boundary. Filling only padding that is computed anyway means a chunk
    never gets wider: under SDPA's mask attention costs the square of the row's width whatever it
    holds, and packing short sequences into new wide rows (first-fit-decreasing) made CPU training
    slower than padding. A row's unfilled tail is pad tokens with positions of their own (a
    separate block nobody reads). Never more tokens than `pad_chunks`, and never more forwards."""
    lengths = [len(s) for s in seqs]
    chunks = length_chunks(lengths, max_tokens)
    width = {i: max(lengths[j] for j in chunk) for chunk in chunks for i in chunk}
    rows = {i: [i] for i in range(len(seqs))}  # a row is named by the sequence it was made for
    room = {i: width[i] - lengths[i] for i in rows}
    gaps = sorted((room[r], r) for r in rows)  # best fit by bisection: a step may hold thousands of sequences
    for i in sorted(rows, key=lambda i: lengths[i]):
        if len(rows[i]) > 1:  # it holds others already: moving it would move them too
            continue
        del gaps[bisect_left(gaps, (room[i], i))]  # not into its own row
        at = bisect_left(gaps, (lengths[i], -1))  # the smallest gap it fits
        if at == len(gaps):
            insort(gaps, (room[i], i))
            continue
        _, host = gaps.pop(at)
        rows[host].append(i)
        room[host] -= lengths[i]
        insort(gaps, (room[host], host))
        del rows[i], room[i]
    out = []
    for chunk in chunks:
        kept = [r for r in chunk if r in rows]
        if not kept:
            continue
        w = max(width[r] - room[r] for r in kept)
        ids = torch.full((len(kept), w), pad_id, dtype=torch.long)
        positions = torch.zeros((len(kept), w), dtype=torch.long)
        members, last = [], []
        for r, row in enumerate(kept):
            at = 0
            for i in rows[row]:
                ids[r, at:at + lengths[i]] = torch.tensor(seqs[i])
                positions[r, at:at + lengths[i]] = torch.arange(lengths[i])
                members.append(i)
                last.append(r * w + at + lengths[i] - 1)
                at += lengths[i]
            positions[r, at:] = torch.arange(w - at)
        out.append((members, ids, positions, torch.tensor(last)))
    return out
