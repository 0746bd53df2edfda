"""Circuit tasks: clean / corrupted prompt pairs with the answer each should predict, and
the metric (a mean logit difference) that patching and faithfulness curves measure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mxd_lens.circuits.patching import Metric


@dataclass
class Task:
    """Clean / corrupted prompt pairs of one length and the answer pair of each prompt."""

    clean: Int[Tensor, "batch pos"]
    """Clean prompts (the behaviour happens)."""
    corrupted: Int[Tensor, "batch pos"]
    """Corrupted prompts (the answer flips)."""
    good: Int[Tensor, " batch"]
    """Token the clean prompt should predict next."""
    bad: Int[Tensor, " batch"]
    """Competing token (what the corrupted prompt predicts)."""
    labels: list[str] = field(default_factory=list)
    """One string per position of the first clean prompt, for plots."""

    def metric(self) -> Metric:
        """Mean logit difference logit(good) - logit(bad) at the last position."""
        rows = torch.arange(len(self.good))
        good, bad = self.good, self.bad

        def logit_diff(logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
            last = logits[:, -1]
            return (last[rows, good.to(last.device)] - last[rows, bad.to(last.device)]).mean()

        return logit_diff


IOI_NAMES = [
    ("Mary", "John"), ("Alice", "Bob"), ("Sarah", "Tom"), ("Emma", "James"), ("Anna", "David"),
    ("Lisa", "Mark"), ("Kate", "Paul"), ("Susan", "Peter"), ("Laura", "Michael"), ("Jane", "Robert"),
    ("Rachel", "Daniel"), ("Helen", "George"),
]  # fmt: skip
IOI_PLACES = ["store", "park", "school", "office", "beach", "market"]
IOI_OBJECTS = ["a drink", "a book", "a gift", "an apple", "a letter", "a ball"]


def ioi_task(tokenizer: Any, n_prompts: int = 12, prefix_token: int = 0) -> Task:
    """Indirect-object identification: "When A and B went to the P, B gave O to" -> " A".

    The corrupted prompt repeats A instead of B, which flips the answer to " B"; the
    metric is logit(" A") - logit(" B"). Every prompt starts with `prefix_token`
    (SmolLM2's <|endoftext|>) and all prompts have one length.
    """
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or not 1 <= n_prompts <= len(IOI_NAMES):
        raise ValueError(f"n_prompts={n_prompts!r}; expected an integer in 1..{len(IOI_NAMES)}")

    def enc(text: str) -> list[int]:
        return [prefix_token] + tokenizer(text, add_special_tokens=False)["input_ids"]

    clean, corrupted, good, bad = [], [], [], []
    for i, (a, b) in enumerate(IOI_NAMES[:n_prompts]):
        place, obj = IOI_PLACES[i % len(IOI_PLACES)], IOI_OBJECTS[i % len(IOI_OBJECTS)]
        clean.append(enc(f"When {a} and {b} went to the {place}, {b} gave {obj} to"))
        corrupted.append(enc(f"When {a} and {b} went to the {place}, {a} gave {obj} to"))
        ga, gb = enc(f" {a}")[1:], enc(f" {b}")[1:]
        if len(ga) != 1 or len(gb) != 1:
            raise ValueError(f"names {a!r}/{b!r} are not single tokens for this tokenizer")
        good.append(ga[0])
        bad.append(gb[0])
    lengths = {len(t) for t in clean + corrupted}
    if len(lengths) != 1:
        raise ValueError(f"the IOI prompts tokenise to different lengths {sorted(lengths)}; they must match")
    labels = [tokenizer.decode([t]) for t in clean[0]]
    return Task(torch.tensor(clean), torch.tensor(corrupted), torch.tensor(good), torch.tensor(bad), labels)


__all__ = ["IOI_NAMES", "IOI_OBJECTS", "IOI_PLACES", "Task", "ioi_task"]
