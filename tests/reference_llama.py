"""An independent PA-LRP / AttnLRP for Hugging Face ``LlamaForCausalLM``, written from the rules.

It shares no code with lens_palrp: it re-implements the LLaMA forward from the Hugging Face
weights and realizes every rule with its own detach tricks. RoPE is written as the products
``q * cos + rotate_half(q) * sin`` with the cos/sin tables as per-layer, per-head *inputs*
(leaves), so their relevance ``table * grad`` is read directly from autograd (Eq. 7-10), instead
of lens_palrp's recovery of the table relevance from the rotated vectors.
"""

from __future__ import annotations

import torch


def _half(x, on=True):
    """Uniform rule for one factor of a product: same value, half the gradient."""
    return x.detach() + 0.5 * (x - x.detach()) if on else x


def _rms(x, weight, eps):
    """RMSNorm with the scale detached (identity rule on the normalization)."""
    scale = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach()
    return x / scale * weight


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _silu_identity(x):
    """SiLU under the identity rule: value silu(x), gradient silu(x)/x."""
    y = torch.nn.functional.silu(x)
    ratio = torch.where(x == 0, torch.zeros_like(x), y / torch.where(x == 0, torch.ones_like(x), x))
    return y.detach() + (x - x.detach()) * ratio.detach()


def explain_llama(hf_model, input_ids: torch.Tensor, target_id: int, positional: bool = True):
    """Relevance of the logit of ``target_id`` at the last position.

    Returns ``(logit, semantic [b, pos], positional [b, layers, heads, pos], heads [b, L, H, pos])``.
    """
    cfg = hf_model.config
    m = hf_model.model
    b, n = input_ids.shape
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = cfg.hidden_size // H
    emb = m.embed_tokens.weight[input_ids].detach().clone().requires_grad_(True)
    # RoPE tables in float64 from the config (Hugging Face builds them in float32)
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)[None].expand(b, n, dh)
    cos, sin = angles.cos(), angles.sin()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    tables, z_leaves = [], []
    x = emb
    for layer in m.layers:
        at = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        q = (h @ at.q_proj.weight.T).view(b, n, H, dh)
        k = (h @ at.k_proj.weight.T).view(b, n, Hkv, dh).repeat_interleave(H // Hkv, dim=2)
        v = (h @ at.v_proj.weight.T).view(b, n, Hkv, dh).repeat_interleave(H // Hkv, dim=2)
        # per-layer, per-head copies of the tables, one for the query and one for the key side
        tq_c, tq_s, tk_c, tk_s = (
            t[:, :, None, :].expand(b, n, H, dh).clone().requires_grad_(positional)
            for t in (cos, sin, cos, sin)
        )
        tables.append((tq_c, tq_s, tk_c, tk_s))
        q_rot = _half(q, positional) * _half(tq_c, positional) + _half(_rotate_half(q), positional) * _half(tq_s, positional)
        k_rot = _half(k, positional) * _half(tk_c, positional) + _half(_rotate_half(k), positional) * _half(tk_s, positional)
        scores = torch.einsum("bqhd,bkhd->bhqk", _half(q_rot), _half(k_rot)) / dh**0.5
        scores = scores.masked_fill(~causal, float("-inf"))
        pattern = torch.softmax(scores, -1)
        z = torch.einsum("bhqk,bkhd->bqhd", _half(pattern), _half(v))
        z_leaves.append(z)  # relevance of each head's output: z * grad
        x = x + z.reshape(b, n, H * dh) @ at.o_proj.weight.T
        h2 = _rms(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        gate = h2 @ layer.mlp.gate_proj.weight.T
        up = h2 @ layer.mlp.up_proj.weight.T
        x = x + (_half(_silu_identity(gate)) * _half(up)) @ layer.mlp.down_proj.weight.T
    final = _rms(x, m.norm.weight, m.norm.variance_epsilon)
    logit = final[:, -1] @ hf_model.lm_head.weight[target_id]
    L = len(m.layers)
    leaves = [emb] + z_leaves + ([t for group in tables for t in group] if positional else [])
    grads = torch.autograd.grad(logit.sum(), leaves)
    semantic = (emb * grads[0]).sum(-1).detach()
    heads = torch.stack(
        [(z * g).sum(-1).transpose(1, 2) for z, g in zip(z_leaves, grads[1 : 1 + L])], 1
    ).detach()
    pos = torch.zeros(b, L, H, n, dtype=emb.dtype)
    if positional:
        for layer_idx in range(L):
            for t_idx in range(4):
                t = tables[layer_idx][t_idx]
                g = grads[1 + L + 4 * layer_idx + t_idx]
                pos[:, layer_idx] += (t * g).sum(-1).transpose(1, 2).detach()
    return logit.detach(), semantic, pos, heads
