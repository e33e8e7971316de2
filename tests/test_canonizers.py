"""Canonizers: each rewrite is undone, also when the sweep fails, and changes no number."""

import pytest
import torch

import lens_palrp as lp
from lens_palrp.canonizers import Canonizer, canonized

try:
    from transformer_lens import HookedTransformer  # noqa: F401
    from models import make_model
except ImportError:  # TransformerLens 4
    make_model = None

needs_hooked = pytest.mark.skipif(make_model is None, reason="HookedTransformer is not in TransformerLens 4")


class _Flag(Canonizer):
    def __init__(self, log, name, fail_on_remove=False):
        self.log, self.name, self.fail = log, name, fail_on_remove

    def register(self, family, sweep):
        self.log.append(("register", self.name))

    def remove(self):
        self.log.append(("remove", self.name))
        if self.fail:
            raise RuntimeError(f"{self.name} failed")


def test_removed_in_reverse_order_even_when_the_body_or_a_remove_fails():
    log = []
    with pytest.raises(KeyError):
        with canonized([_Flag(log, "a"), _Flag(log, "b")], None, None):
            raise KeyError("sweep failed")
    assert log == [("register", "a"), ("register", "b"), ("remove", "b"), ("remove", "a")]
    log.clear()
    with pytest.raises(RuntimeError, match="b failed"):
        with canonized([_Flag(log, "a"), _Flag(log, "b", fail_on_remove=True)], None, None):
            pass
    assert log[-1] == ("remove", "a")  # a failing remove does not stop the others


@needs_hooked
def test_gqa_ungrouping_is_restored_after_success_and_failure():
    model = make_model("llama_like", seed=0)
    assert model.cfg.n_key_value_heads not in (None, model.cfg.n_heads)
    before = model.cfg.ungroup_grouped_query_attention
    toks = torch.tensor([[1, 4, 6, 2]])
    lp.explain(model, toks, 3)
    assert model.cfg.ungroup_grouped_query_attention == before
    with pytest.raises(ValueError):
        lp.explain(model, toks, lambda logits: logits[:, -1, 3].detach())  # no dependence: raises mid-sweep
    assert model.cfg.ungroup_grouped_query_attention == before
