"""How the version-1 Attribution files in this folder were made (kept for provenance).

It must run on a checkout from before save format 2 (commit 0172aa5 wrote these files), with the
TransformerLens 3.9 environment: ``Attribution.save`` there writes the tensors and ``path + '.json'``.
Run from that checkout's root: ``PYTHONPATH=. python tests/data/make_v1_fixture.py OUT_DIR``.

Three small files, each a batch of two examples, the second right-padded:

- ``v1_llama_pa_lrp``: the llama-like model (RoPE, grouped-query attention) under PA-LRP, with
  relevance recorded at two hooks and one gradient: the per-layer positional reductions are non-zero;
- ``v1_gpt2_pa_lrp``: the GPT-2-like model (learned positions) under PA-LRP: the input PE's
  positive-part reduction is non-zero;
- ``v1_gpt2_attn_lrp``: the same model under AttnLRP: no PE rule, so the
  positional relevance leaks and the leak reductions are non-zero.

``v1_expected.safetensors`` holds what that code's ``combined()`` and ``conservation()`` returned
for each of them, to compare the loaded files with.
"""

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lens_palrp as lp  # noqa: E402
from models import make_model  # noqa: E402

CASES = {
    "v1_llama_pa_lrp": dict(
        config="llama_like", method="pa_lrp", record=["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_rot_k"],
        record_gradients=["blocks.1.attn.hook_z"],
    ),
    "v1_gpt2_pa_lrp": dict(config="gpt2_like", method="pa_lrp", record=[], record_gradients=[]),
    "v1_gpt2_attn_lrp": dict(config="gpt2_like", method="attn_lrp", record=["hook_embed"], record_gradients=[]),
}
TOKENS = torch.tensor([[0, 4, 9, 2, 17, 12, 3], [0, 5, 11, 7, 1, 1, 1]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
TARGET = torch.tensor([5, 9])
POSITION = torch.tensor([6, 3])


def explain(case):
    model = make_model(case["config"], biases=True)
    attr = lp.explain(model, TOKENS, TARGET, method=case["method"], position=POSITION, attention_mask=MASK,
                      record=case["record"], record_gradients=case["record_gradients"])
    return model, attr


def main(out):
    expected = {}
    for name, case in CASES.items():
        model, attr = explain(case)
        attr.save(os.path.join(out, name + ".safetensors"), model_config=model.cfg)
        for aggregation in ("relu", "abs", "signed"):
            for parts in ("all", "semantic", "positional"):
                expected[f"{name}.combined.{aggregation}.{parts}"] = attr.combined(aggregation, parts).contiguous()
        c = attr.conservation()
        for field in c.__dataclass_fields__:
            expected[f"{name}.conservation.{field}"] = getattr(c, field).contiguous()
    save_file(expected, os.path.join(out, "v1_expected.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
