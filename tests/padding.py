"""Padded batches against single runs: the helpers every family's padding test shares."""

import torch

import lens_palrp as lp

FIELDS = ("semantic", "positional", "positional_input", "heads_by_pos", "mlp", "residual")
D = dict(rtol=1e-9, atol=1e-11)
# float32 models (the zoo): a batch and a single run differ in how many rows one matmul takes at
# once (the unembedding sees one position per example), and float32 BLAS rounds those differently
D32 = dict(rtol=2e-5, atol=2e-6)


# float64 models whose Hugging Face code computes part of the attention in float32 (BLOOM's
# baddbmm and softmax, GPT-J's scores, OPT's softmax): a batch and a single run meet there, in
# float32 matmuls of other shapes, so they agree to float32 rounding of the values involved (BLOOM:
# 2.5e-7 of the logit under AVX2, 1e-15 under AVX-512), bounded at 8 float32 eps of the logit
F32_INSIDE = 8 * torch.finfo(torch.float32).eps


def tolerance(attr, meets_in=None, scale=None) -> dict:
    """``D`` for float64 results, ``D32`` for a float32 model's; for a float64 model whose
    arithmetic paths meet in float32 (``meets_in``), 8 float32 eps of ``scale`` (the magnitude of
    the compared values)."""
    if attr.semantic.dtype == torch.float32:
        return D32
    if meets_in == torch.float32:
        return dict(rtol=F32_INSIDE, atol=F32_INSIDE * float(scale))
    return D


def pad(rows, side, pad_id=1):
    """``[batch, pos]`` tokens and mask, ``rows`` padded on ``side`` with ``pad_id``."""
    n = max(r.numel() for r in rows)
    tokens = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, r.numel()) if side == "right" else slice(n - r.numel(), n)
        tokens[i, sl], mask[i, sl] = r, 1
    return tokens, mask


def assert_rows_equal_single_runs(model, rows, batch_attr, target, method, meets_in=None, **kwargs):
    """Each row of ``batch_attr`` equals its single run to rounding (a batch and a single run
    round differently), and its pads hold exactly zero (by construction). ``meets_in``:
    ``torch.float32`` where a float64 model computes part of its attention in float32."""
    for i, row in enumerate(rows):
        # on the batch's device (a CUDA model gets CUDA tokens, as the batch did)
        one = lp.explain(model, row[None].to(batch_attr.tokens.device), target, method=method, **kwargs)

        def tol(reference, one=one):  # every map is a share of the target: rounding at its size
            return tolerance(batch_attr, meets_in, max(float(reference.abs().max()), float(one.target_value.abs().max())))

        n = row.numel()
        torch.testing.assert_close(batch_attr.target_value[i], one.target_value[0], **tol(one.target_value[0]))
        assert batch_attr.tokens[i, :n].tolist() == row.tolist()
        assert batch_attr.str_tokens[i] == one.str_tokens[0]
        for field in FIELDS:
            full, single = getattr(batch_attr, field)[i], getattr(one, field)[0]
            torch.testing.assert_close(full[..., :n], single, **tol(single), msg=field)
            assert float(full[..., n:].abs().sum()) == 0, f"{field}: relevance on a pad"
        for aggregation in ("relu", "abs"):
            single = one.combined(aggregation)[0]
            torch.testing.assert_close(batch_attr.combined(aggregation)[i, :n], single, **tol(single))


ROWS = [torch.tensor([0, 4, 9, 2, 17, 12, 3, 6, 8]), torch.tensor([0, 4, 9, 2, 17])]
