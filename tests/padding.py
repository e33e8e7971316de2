"""Padded batches against single runs: the helpers every family's padding test shares."""

import torch

import lens_palrp as lp

FIELDS = ("semantic", "positional", "positional_input", "heads_by_pos", "mlp", "residual")
D = dict(rtol=1e-9, atol=1e-11)
# float32 models (the zoo): a batch and a single run differ in how many rows one matmul takes at
# once (the unembedding sees one position per example), and float32 BLAS rounds those differently
D32 = dict(rtol=2e-5, atol=2e-6)


def tolerance(attr) -> dict:
    """``D`` for float64 results, ``D32`` for a float32 model's."""
    return D32 if attr.semantic.dtype == torch.float32 else D


def pad(rows, side, pad_id=1):
    """``[batch, pos]`` tokens and mask, ``rows`` padded on ``side`` with ``pad_id``."""
    n = max(r.numel() for r in rows)
    tokens = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, r.numel()) if side == "right" else slice(n - r.numel(), n)
        tokens[i, sl], mask[i, sl] = r, 1
    return tokens, mask


def assert_rows_equal_single_runs(model, rows, batch_attr, target, method, **kwargs):
    for i, row in enumerate(rows):
        # on the batch's device (a CUDA model gets CUDA tokens, as the batch did)
        one = lp.explain(model, row[None].to(batch_attr.tokens.device), target, method=method, **kwargs)
        n, tol = row.numel(), tolerance(batch_attr)
        torch.testing.assert_close(batch_attr.target_value[i], one.target_value[0], **tol)
        assert batch_attr.tokens[i, :n].tolist() == row.tolist()
        assert batch_attr.str_tokens[i] == one.str_tokens[0]
        for field in FIELDS:
            full = getattr(batch_attr, field)[i]
            torch.testing.assert_close(full[..., :n], getattr(one, field)[0], **tol, msg=field)
            assert float(full[..., n:].abs().sum()) == 0, f"{field}: relevance on a pad"
        for aggregation in ("relu", "abs"):
            torch.testing.assert_close(batch_attr.combined(aggregation)[i, :n], one.combined(aggregation)[0], **tol)


ROWS = [torch.tensor([0, 4, 9, 2, 17, 12, 3, 6, 8]), torch.tensor([0, 4, 9, 2, 17])]
