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
    """At every position ``t >= k`` the answer is the token ``k`` positions back, ``x[t - k]``.

    Inputs are ``<bos>`` followed by uniformly random symbols, so nothing but the position
    offset tells which token to output: the explanation of the answer at ``t`` must point at
    position ``t - k``.
    """

    k: int = 3
    n_pos: int = 16

    def batch(self, size: int, generator: torch.Generator):
        body = torch.randint(len(SPECIAL), len(VOCAB), (size, self.n_pos - 1), generator=generator)
        tokens = torch.cat([torch.zeros(size, 1, dtype=torch.long), body], dim=1)
        labels = torch.full_like(tokens, -100)
        labels[:, self.k + 1 :] = tokens[:, 1 : self.n_pos - self.k]  # skip <bos> as an answer
        return tokens, labels
