"""Variable-length attention for the "varlen" layout: datums end to end in one row, no mask.

Registered with transformers as the attention implementation "rlpipe_varlen". The learner
passes the cumulative sequence lengths through the model's forward kwargs (`cu_seq_lens_q`,
`max_length_q`, the names transformers uses for flash attention). On CUDA it runs torch's
flash varlen kernel (torch.nn.attention.varlen), so attention costs each datum's own
length², with neither pads nor a mask. Elsewhere it runs sdpa datum by datum: a reference
path for tests and a fallback, slower than the "rows" layout on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "rlpipe_varlen"


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, **kwargs):
    """query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (1, T, Hq, D), as transformers expects."""
    if softcap is not None:
        raise ValueError("the varlen layout does not support attention logit softcapping; use layout='rows'")
    if query.shape[2] != key.shape[2]:
        raise ValueError("varlen attention is for training forwards over whole sequences, not decoding with a cache")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # a plain call (no packing info): each row is one sequence
        out = torch.cat([_one_sequence(*(t[b].transpose(0, 1) for t in (query, key, value)), scaling, sliding_window)[None]
                         for b in range(query.shape[0])])
        return out, None
    if query.shape[0] != 1:
        raise ValueError("varlen attention takes one packed row")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        window = (sliding_window - 1, 0) if sliding_window else (-1, 0)  # (-1, 0): causal
        max_len = int(kwargs["max_length_q"])
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=window,
                          enable_gqa=q.shape[1] != k.shape[1])
    else:
        out = torch.cat([_one_sequence(q[a:b], k[a:b], v[a:b], scaling, sliding_window)
                         for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    return out.unsqueeze(0), None


def _one_sequence(q, k, v, scaling, sliding_window):
    n = q.shape[0]
    mask = None
    if sliding_window and n > sliding_window:
        pos = torch.arange(n, device=q.device)
        distance = pos[:, None] - pos[None, :]
        mask = (distance >= 0) & (distance < sliding_window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
        is_causal=mask is None, scale=scaling, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


def attention_softcap(config) -> float | None:
    """The model's attention-logit soft-cap (Gemma-2), or None."""
    text = getattr(config, "text_config", None)
    return getattr(config, "attn_logit_softcapping", None) or getattr(text, "attn_logit_softcapping", None)


def load_options(config) -> dict:
    """from_pretrained options that make transformers compute what vLLM computes: its sdpa and
    flash paths ignore attention soft-capping (Gemma-2), which vLLM applies, so such models load
    with eager attention (1.6e-2 apart in logprobs otherwise)."""
    return {"attn_implementation": "eager"} if attention_softcap(config) else {}


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    return NAME


def cuda_varlen_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_matches_sdpa(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether varlen attention gives sdpa's result on this device (two packed sequences,
    grouped-query heads, a sliding window): checked once before the learner relies on it,
    since the kernel differs by GPU and torch build."""
    g = torch.Generator().manual_seed(0)
    lengths, heads, kv_heads, dim = [5, 11], 4, 2, 64
    q, k, v = (torch.randn(1, h, sum(lengths), dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
    try:
        for window in (None, 4):
            got, _ = varlen_attention(None, q, k, v, None, scaling=dim**-0.5, sliding_window=window,
                                      cu_seq_lens_q=cu, max_length_q=max(lengths))
            want = torch.cat([_one_sequence(*(t[0, :, a:b].transpose(0, 1) for t in (q, k, v)), dim**-0.5, window)
                              for a, b in ((0, lengths[0]), (lengths[0], sum(lengths)))])
            if not torch.allclose(got[0].float(), want.float(), atol=2e-2 if dtype != torch.float32 else 1e-4):
                return False
    except Exception:  # a kernel this device or build lacks
        return False
    return True
