"""Training data of `llmkern train`: batches of (tokens, labels), labels -100 where nothing is scored.

- `SyntheticData`: llmkern.demo's digit tasks. The fine-tune task is reversal without a task token;
  the optional pretraining of the base mixes COPY and REV (see llmkern/demo.py). Exact-match
  accuracy on held-out strings measures what the method learned.
- `JsonlData`: a local JSONL file of {"text": ...} (every real token scored) or {"prompt": ...,
  "response": ...} (SFT: only the response and its EOS scored), tokenized by `ByteTokenizer` (needs
  no download) or a local tokenizer directory (transformers.AutoTokenizer, nothing downloaded).

Every source draws its training batches from a torch.Generator seeded by the seed and the
data-parallel replica, so ranks of one replica (pipeline stages) read the same batches, and its
`state_dict()` lets a resumed run draw exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmkern import demo


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, then PAD 256, BOS 257, EOS 258."""

    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class _HFTokenizer:
    """A local tokenizer directory behind ByteTokenizer's interface."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(f"data.tokenizer: the tokenizer in {path} has no EOS token")
        self.eos_token_id = eos
        self.bos_token_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else eos
        self.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def tokenizer_of(spec: str):
    return ByteTokenizer() if spec == "byte" else _HFTokenizer(spec)


class SyntheticData:
    """The digit tasks (llmkern.demo.Task) as (tokens, labels) batches."""

    vocab_size = demo.VOCAB
    pad_token_id, bos_token_id, eos_token_id = demo.PAD, demo.BOS, demo.EOS

    def __init__(self, setup: demo.Setup, seed: int, replica: int):
        self.setup = setup
        self.task = demo.Task(setup, seed=seed + 1, rank=replica)
        heldout = [demo.encode(d, "reverse", self.task.seq_len) for d in self.task.heldout]
        self._eval = _labelled(torch.stack([t for t, _ in heldout]), torch.stack([m for _, m in heldout]))

    def batch(self, n: int, *, pretrain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, mask = self.task.batch(("copy", "reverse_marked") if pretrain else ("reverse",), n)
        return _labelled(tokens, mask)

    def eval_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out strings of the fine-tune task."""
        return self._eval

    def accuracy(self, model, which: str = "reverse") -> float:
        """Exact match of greedy decoding on the held-out strings (llmkern.demo.accuracy)."""
        return demo.accuracy(model, self.task, which)

    def state_dict(self) -> dict:
        return {"generator": self.task.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.task.gen.set_state(state["generator"])


class JsonlData:
    """Examples of a local JSONL file, padded or truncated to `seq_len` tokens."""

    def __init__(self, path: str, tokenizer: str, seq_len: int, eval_fraction: float, seed: int, replica: int):
        self.tok = tokenizer_of(tokenizer)
        self.vocab_size = self.tok.vocab_size
        self.pad_token_id, self.bos_token_id, self.eos_token_id = (
            self.tok.pad_token_id, self.tok.bos_token_id, self.tok.eos_token_id)
        rows = []
        for i, line in enumerate(Path(path).read_text().splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data.path: {path} line {i + 1} is not JSON: {e}") from e
            rows.append(self._encode(obj, seq_len, f"{path} line {i + 1}"))
        if len(rows) < 2:
            raise ValueError(f"data.path: {path} has {len(rows)} example(s); at least 2 are needed (train and eval)")
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        n_eval = max(1, round(eval_fraction * len(rows)))
        tokens = torch.stack([rows[i][0] for i in order.tolist()])
        labels = torch.stack([rows[i][1] for i in order.tolist()])
        self._eval = (tokens[:n_eval], labels[:n_eval])
        self.tokens, self.labels = tokens[n_eval:], labels[n_eval:]
        self.gen = torch.Generator().manual_seed(seed + 7919 * (replica + 1))

    def _encode(self, obj, seq_len: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(obj, dict):
            raise ValueError(f"data.path: {where}: expected an object with \"text\" or \"prompt\" and \"response\"")
        if "text" in obj and isinstance(obj["text"], str):
            ids = [self.bos_token_id] + self.tok.encode(obj["text"]) + [self.eos_token_id]
            scored = [False] + [True] * (len(ids) - 1)
        elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
            prompt = [self.bos_token_id] + self.tok.encode(obj["prompt"])
            response = self.tok.encode(obj["response"]) + [self.eos_token_id]
            ids, scored = prompt + response, [False] * len(prompt) + [True] * len(response)
        else:
            raise ValueError(f"data.path: {where}: expected \"text\" (a string) or \"prompt\" and \"response\" "
                             f"(strings), got keys {sorted(obj)}")
        ids, scored = ids[:seq_len], scored[:seq_len]
        pad = seq_len - len(ids)
        tokens = torch.tensor(ids + [self.pad_token_id] * pad, dtype=torch.long)
        mask = torch.tensor(scored + [False] * pad)
        return tokens, tokens.masked_fill(~mask, -100)

    def batch(self, n: int, *, pretrain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.tokens.shape[0], (n,), generator=self.gen)
        return self.tokens[idx], self.labels[idx]

    def eval_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._eval

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])


def _labelled(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tokens, tokens.masked_fill(~mask, -100)
