"""A map is refused when a rule's hook point does not act on the output: never run by the forward
(checked in every sweep), or run but off the computation path (checked for unverified
architectures, with one gradient x input pass). Simulated on the Llama bridge by shadowing
``hook_rot_q`` of layer 0: skipped entirely, or called with its result thrown away."""

import warnings

import pytest
import torch

import lens_palrp as lp
from bridges import tiny_llama
from lens_palrp.hooks import transformer_bridge

pytest.importorskip("transformer_lens.model_bridge")

TOKENS = torch.randint(2, 18, (1, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))[1]


@pytest.fixture
def unverified(monkeypatch):
    """Llama treated as an architecture nobody checked."""
    monkeypatch.setattr(transformer_bridge, "VERIFIED_ARCHITECTURES", frozenset())


def shadow_rot_q(monkeypatch, bridge, keep_result: bool):
    attn = bridge.blocks[0].attn
    point = attn.hook_rot_q
    if keep_result is None:  # never called
        replacement = lambda q: q  # noqa: E731
    else:  # called, its result thrown away: the hooks run, the model computes around them
        replacement = lambda q: (point(q), q)[1]  # noqa: E731
    monkeypatch.setitem(attn.__dict__, "hook_rot_q", replacement)


@pytest.mark.parametrize("method", ["pa_lrp", "grad_x_input"])
def test_a_rule_site_the_forward_never_runs_is_refused(llama, monkeypatch, method):
    shadow_rot_q(monkeypatch, llama, keep_result=None)
    with pytest.raises(NotImplementedError, match=r"'llama' cannot be explained.*blocks\.0\.attn\.hook_rot_q.*never run"):
        lp.explain(llama, TOKENS, 3, method=method)


def test_an_unverified_architecture_with_an_observe_only_rule_site_is_refused(llama, monkeypatch, unverified):
    shadow_rot_q(monkeypatch, llama, keep_result=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match=r"blocks\.0\.attn\.hook_rot_q'\] are not in the computation path"):
            lp.explain(llama, TOKENS, 3, allow_unverified=True)


def test_an_unverified_architecture_with_every_site_in_the_path_is_explained_with_a_warning(
        llama, unverified, monkeypatch):
    with pytest.warns(UserWarning, match="unverified architecture 'llama'"):
        attr = lp.explain(llama, TOKENS, 3, allow_unverified=True)
    monkeypatch.undo()
    reference = lp.explain(llama, TOKENS, 3)  # the same maps as when verified
    assert torch.equal(attr.semantic, reference.semantic)
    assert torch.equal(attr.positional, reference.positional)


def test_without_the_opt_in_an_unverified_architecture_is_refused(llama, unverified):
    with pytest.raises(NotImplementedError, match="has not verified TransformerBridge maps for the architecture 'llama'"):
        lp.explain(llama, TOKENS, 3)
