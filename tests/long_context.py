"""What the long-context tests share: two explanations compared map by map."""

from __future__ import annotations

MAP_FIELDS = ["semantic", "positional", "positional_input", "heads_by_pos", "mlp", "residual", "target_value"]


def assert_same_maps(a, b, rtol=1e-10):
    """Every map, the per-layer reductions behind combined() and conservation(), and the records."""
    target = float(b.target_value.abs().max())

    def close(x, y, what, of_target=False):
        scale = max(float(y.abs().max()), target if of_target else 1e-12)
        err = float((x - y).abs().max())
        assert err <= rtol * scale, f"{what}: max error {err:.3g} against scale {scale:.3g}"

    for name in MAP_FIELDS:
        close(getattr(a, name), getattr(b, name), name)
    for aggregation in ("relu", "abs"):
        close(a.combined(aggregation), b.combined(aggregation), f"combined({aggregation!r})")
    ca, cb = a.conservation(), b.conservation()
    for name in ("softmax_absorbed_per_layer", "positional_per_layer", "positional_leak_per_layer", "other_absorbed"):
        close(getattr(ca, name), getattr(cb, name), name, of_target=True)  # sums that may be ~0
    assert set(a.hooks) == set(b.hooks) and set(a.gradients) == set(b.gradients)
    for key in b.hooks:
        close(a.hooks[key], b.hooks[key], f"hooks[{key!r}]")
    for key in b.gradients:
        close(a.gradients[key], b.gradients[key], f"gradients[{key!r}]")


def swapped_forwards(model):
    """Modules whose forward is replaced on the instance (none once a sweep is over)."""
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]
