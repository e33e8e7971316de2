"""Synthetic tasks where position decides the answer, and their word-level tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SYMBOLS = list("abcdefghijklmnop")
SPECIAL = ["<bos>", "<pad>"]
VOCAB = SPECIAL + SYMBOLS  # id 0 = <bos>, 1 = <pad>, 2.. = symbols


def build_tokenizer(folder: str):
    """A whitespace word-level tokenizer over ``VOCAB`` that prepends ``<bos>``, saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", eos_token="<pad>", unk_token="<pad>",
        add_bos_token=True, padding_side="right",
    )
    fast.save_pretrained(folder)
    return fast


@dataclass(frozen=True)
class RepeatBack:
    name = "repeat-back"

    """At every position ``t >= k`` the answer is the token ``k`` positions back, ``x[t - k]``.

    Inputs are ``<bos>`` followed by uniformly random symbols, so nothing but the position
    offset tells which token to output: the explanation of the answer at ``t`` must point at
    position ``t - k``.
    """

    k: int = 3
    n_pos: int = 16

    def batch(self, size: int, generator: torch.Generator):
        tokens = _random_tokens(size, self.n_pos, generator)
        labels = torch.full_like(tokens, -100)
        labels[:, self.k + 1 :] = tokens[:, 1 : self.n_pos - self.k]  # skip <bos> as an answer
        return tokens, labels

    def relevant_position(self, position: int) -> int:
        """The position whose token answers at ``position``."""
        return position - self.k


@dataclass(frozen=True)
class AbsolutePosition:
    """At every position ``t > p`` the answer is the token at the fixed absolute position ``p``.

    Only the absolute position identifies the answer (learned position embeddings can encode it;
    relative schemes must count), so the explanation must point at position ``p``.
    """

    name = "absolute-position"
    p: int = 2
    n_pos: int = 16

    def batch(self, size: int, generator: torch.Generator):
        tokens = _random_tokens(size, self.n_pos, generator)
        labels = torch.full_like(tokens, -100)
        labels[:, self.p + 1 :] = tokens[:, self.p : self.p + 1]
        return tokens, labels

    def relevant_position(self, position: int) -> int:
        return self.p


TASKS = {"repeat-back": RepeatBack, "absolute-position": AbsolutePosition}


def make_task(spec: dict):
    """A task from its zoo spec ``{"name": ..., **parameters}`` (name defaults to repeat-back)."""
    spec = dict(spec)
    return TASKS[spec.pop("name", "repeat-back")](**spec)


def _random_tokens(size: int, n_pos: int, generator: torch.Generator) -> torch.Tensor:
    body = torch.randint(len(SPECIAL), len(VOCAB), (size, n_pos - 1), generator=generator)
    return torch.cat([torch.zeros(size, 1, dtype=torch.long), body], dim=1)
