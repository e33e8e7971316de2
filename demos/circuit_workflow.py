# %% [markdown]
# # A circuit-analysis workflow with PA-LRP
#
# The zoo model `rope-repeat` answers, at every position, with the token 3 positions back. Which
# heads find that position, and does PA-LRP agree with activation patching? Run as a script
# (`python demos/circuit_workflow.py`) or open it as a notebook (the `# %%` cells).

# %%
import os

import torch

import lens_palrp as lp
from lens_palrp import analyses as an

OUT = os.environ.get("LENS_PALRP_DEMO_OUT", os.path.join("demos", "out"))
os.makedirs(OUT, exist_ok=True)
model, tokenizer = lp.zoo.load("rope-repeat")
clean, corrupted = "c h a p k b e g", "c h a p n b e g"  # the answer k (3 back) replaced by n
k, n = model.to_single_token("k"), model.to_single_token("n")


def metric(logits):
    """Logit difference between the clean and the corrupted answer at the last position."""
    return logits[:, -1, k] - logits[:, -1, n]


# %% [markdown]
# ## 1. Explain the clean prediction

# %%
attr = lp.explain(model, clean, metric)
print(attr.conservation())
print("top tokens:", attr.top_tokens(0, 3))

# %% [markdown]
# ## 2. Which heads carry positional relevance?

# %%
per_head = an.positional_heads_data(attr)
layer, head = divmod(int(per_head.abs().argmax()), per_head.shape[1])
print(f"most positional head: L{layer}H{head} ({float(per_head[layer, head]):.4f})")
print(per_head)
an.write_html([an.positional_heads_figure(attr), an.heads_figure(attr)], os.path.join(OUT, "circuit_heads.html"))

# %% [markdown]
# ## 3. Compare with activation patching over a set of pairs (and attribution-patching estimates)
#
# Sixteen pairs: random symbols, the answer (3 back from the end) swapped in the corrupted prompt.
# Activation patching runs once; the estimates reuse it (`patching=`), so nothing runs twice.

# %%
import numpy as np

rng = np.random.default_rng(0)
symbols = list("abcdefghijklmnop")
cleans, corrupteds, correct, wrong = [clean], [corrupted], ["k"], ["n"]
for _ in range(15):
    words = list(rng.choice(symbols, 8))
    other = str(rng.choice([s for s in symbols if s != words[-3]]))
    cleans.append(" ".join(words))
    corrupteds.append(" ".join(words[:-3] + [other] + words[-2:]))
    correct.append(words[-3])
    wrong.append(other)
pair_metric = an.logit_difference(correct, wrong, model=model)  # each pair its own answer
patched = an.activation_patching(model, cleans, corrupteds, pair_metric)
comparison = an.compare_with_patching(model, cleans, corrupteds, pair_metric, patching=patched)
estimates = an.relevance_patching(model, cleans, corrupteds, pair_metric, patching=patched)
print(comparison.agreement(n_resamples=500).query("statistic == 'spearman_of_means'").round(3))
print(estimates.agreement(n_resamples=500).query("statistic == 'spearman_of_means'").round(3))
an.write_html([comparison.figure("pa_lrp"), estimates.figure("pa_lrp")], os.path.join(OUT, "circuit_patching.html"))

# %% [markdown]
# ## 4. Save the result (and load it back)

# %%
path = attr.save(os.path.join(OUT, "circuit_attr.safetensors"), model_config=model.cfg)
again = lp.Attribution.load(path)
assert torch.equal(again.positional, attr.positional)
attr.report(os.path.join(OUT, "circuit_report.html"))
print("saved", path, "and", os.path.join(OUT, "circuit_report.html"))
