"""Training data: JSONL prompt/response records -> chat-templated token ids with labels.

One record per line::

    {"prompt": "What is 2+2?", "response": "4."}                      # required keys
    {"prompt": "...", "response": "...", "system": "...", "adapter": "json"}   # optional

Each record becomes the conversation ``[system?, user: prompt, assistant: response]``
rendered by the tokenizer's own chat template. The loss is on the response only:

    ids     = template(system?, user, assistant)         full conversation
    prefix  = template(system?, user) + generation prompt  ("<|im_start|>assistant\\n")
    labels  = -100 for ids[:len(prefix)], ids[i] after it

so the response tokens *and* the template's end-of-turn tokens (e.g. ``<|im_end|>``)
are learned, which teaches the model to stop, and nothing of the system or user
turns is. ``collate`` right-pads a list of examples into ``[B, T]`` tensors (pad
label -100, attention mask 0) and carries the per-row adapter names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


@dataclass
class Example:
    """One tokenized conversation: ``input_ids [T]``, ``labels [T]`` (-100 = no loss)."""

    input_ids: list[int]
    labels: list[int]
    adapter: str | None = None

    @property
    def num_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; each must hold string ``prompt`` and ``response``."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            for key in ("prompt", "response"):
                if not isinstance(rec.get(key), str):
                    raise ValueError(f"{path}:{line_no}: record needs a string {key!r} field")
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _messages(rec: dict, system: str | None) -> list[dict]:
    system = rec.get("system", system)
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": rec["prompt"]}]


def _ids(out) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True);
    # older versions return the list itself.
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def encode(rec: dict, tokenizer, max_length: int, system: str | None = None,
           adapter: str | None = None) -> Example:
    """Tokenize one record with ``tokenizer``'s chat template; labels on the response only.

    ``max_length`` truncates from the right (a response cut short still trains on
    what is left; a prompt that fills ``max_length`` leaves no label and raises).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("tokenizer has no chat_template; set tokenizer.chat_template first")
    prompt_msgs = _messages(rec, system)
    full_msgs = prompt_msgs + [{"role": "assistant", "content": rec["response"]}]
    prefix = _ids(tokenizer.apply_chat_template(prompt_msgs, tokenize=True,
                                                add_generation_prompt=True))
    full = _ids(tokenizer.apply_chat_template(full_msgs, tokenize=True))
    # The prompt is a token prefix of the conversation for ChatML-style templates; where a
    # tokenizer merges across the boundary, mask the longest common prefix instead.
    n_prompt = 0
    while n_prompt < min(len(prefix), len(full)) and prefix[n_prompt] == full[n_prompt]:
        n_prompt += 1
    labels = [IGNORE_INDEX] * n_prompt + full[n_prompt:]
    ids, labels = full[:max_length], labels[:max_length]
    ex = Example(ids, labels, adapter if adapter is not None else rec.get("adapter"))
    if ex.num_response_tokens == 0:
        raise ValueError(f"max_length={max_length} leaves no response token for prompt "
                         f"{rec['prompt'][:40]!r} ({n_prompt} prompt tokens)")
    return ex


def load_examples(path: str | Path, tokenizer, max_length: int = 256,
                  adapter: str | None = None, system: str | None = None) -> list[Example]:
    """Tokenize every record of a JSONL file (see :func:`encode`)."""
    return [encode(r, tokenizer, max_length, system, adapter) for r in read_jsonl(path)]


@dataclass
class Batch:
    """A padded batch: ``input_ids``/``labels``/``attention_mask`` ``[B, T]``, names ``[B]``."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    adapter_names: list[str | None]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pad ``examples`` to the longest one: ``[B, T]`` tensors."""
    if not examples:
        raise ValueError("collate needs at least one example")
    t = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(input_ids, labels, mask, [e.adapter for e in examples])


def batch_order(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples in batch ``step`` (0-based): epochs of seeded shuffles.

    A pure function of ``(step, seed)``, so a resumed run draws exactly the batches
    the uninterrupted run would have drawn, without saving a sampler state.
    """
    if num_examples <= 0:
        raise ValueError("num_examples must be positive")
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, num_examples)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(num_examples, generator=g).tolist()
        take = min(batch_size - len(out), num_examples - offset)
        out += perm[offset:offset + take]
        pos += take
    return out
