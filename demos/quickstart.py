"""Quickstart: explain a shipped RoPE model whose answer is decided by position alone.

The zoo model ``rope-repeat`` outputs, at every position, the token 3 positions back. PA-LRP
should put the token relevance on that token and show which heads use RoPE to find it. The model
loads as a HookedTransformer under TransformerLens 3.x and as a TransformerBridge under 4.x.

    python demos/quickstart.py [--out demos/out/quickstart.html]
"""

import argparse
import os

import torch

import lens_palrp as lp
from lens_palrp.analyses import positional_heads_figure, token_relevance_figure, write_html

PROMPTS = ["c h a p k b e g", "n o p a b c", "f f a k d e l m i j"]
K = 3  # the task: answer with the token K positions back


def bar(value: float, scale: float, width: int = 24) -> str:
    n = int(round(width * abs(value) / scale)) if scale > 0 else 0
    return ("+" if value >= 0 else "-") * n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join("demos", "out", "quickstart.html"))
    args = parser.parse_args()

    model, tokenizer = lp.zoo.load("rope-repeat")
    print(f"model: rope-repeat as a {type(model).__name__} - {lp.zoo.describe('rope-repeat')}\n")
    figures = []
    for prompt in PROMPTS:
        tokens = model.to_tokens(prompt)
        answer = int(tokens[0, -1 - K])
        with torch.no_grad():
            predicted = int(model(tokens)[0, -1].argmax())
        attr = lp.explain(model, prompt, answer)  # PA-LRP, logit of the answer at the last position
        print(f"prompt {prompt!r}: answer {model.to_string(answer)!r} (predicted {model.to_string(predicted)!r})")
        semantic = attr.semantic[0]
        positional = attr.positional[0].sum((0, 1))  # over layers and heads
        scale = float(torch.cat([semantic, positional]).abs().max())
        print(f"  {'pos':>3} {'token':<6} {'semantic':>10}  {'positional':>10}")
        for i, tok in enumerate(attr.str_tokens[0]):
            s, p = float(semantic[i]), float(positional[i])
            print(f"  {i:>3} {tok:<6} {s:>10.4f}  {p:>10.4f}  {bar(s, scale):<24} {bar(p, scale)}")
        c = attr.conservation()
        share = 100 * float(c.positional[0]) / float(c.target_value[0])
        print(f"  logit {float(c.target_value[0]):.3f}: semantic {float(c.semantic[0]):.3f}, "
              f"positional {float(c.positional[0]):.3f} ({share:.1f}%), "
              f"absorbed by softmax {float(c.softmax_absorbed[0]):.3f}, by biases {float(c.other_absorbed[0]):.3f}")
        heads = attr.positional[0].sum(-1)
        layer, head = divmod(int(heads.abs().argmax()), heads.shape[1])
        print(f"  most positional head: L{layer}H{head} ({float(heads[layer, head]):.4f})\n")
        figures.append(positional_heads_figure(attr, title=f"Positional relevance per head - {prompt!r}"))
        figures.append(token_relevance_figure(attr))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_html(figures, args.out, title="lens_palrp quickstart: rope-repeat")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
