"""Sequence DEQ: the DEQ-Transformer of Bai, Kolter & Koltun (2019, "Deep equilibrium models",
§3.3 and §4), as a character-level language model, and its weight-tied unrolled counterpart.

The state is the hidden sequence ``z`` of shape ``(B, T, d)``; the injected input ``x`` (same
shape) is the embedded tokens plus learned absolute position embeddings (not the
Transformer-XL relative positions of the paper). One application of the cell is

    a = W_o · CausalMHA(z + x)                     (queries, keys, values from z + x)
    h = LN₁(x + a)
    f(z, x) = LN₂(h + FFN(h)),   FFN(h) = W₂ ReLU(W₁ h + b₁) + b₂

so the embedded tokens are injected into every attention input and into the residual stream,
as the paper injects them into every layer. Differences from the paper, and why: the residual
path carries the injection ``x`` rather than the state ``z`` — with ``z + a`` inside the layer
norm, ∂f/∂z is close to the identity on the layer norm's tangent space and plain iterations
barely contract; no dropout and no weight normalization (the equilibrium is a deterministic
function of the parameters, so derivatives are exact).

Position ``t`` attends to positions ``≤ t`` only, so z*[:, t] depends on tokens ``≤ t``: the
fixed point of a causal map is causal. Samples (dim 0) converge independently.

* :class:`TransformerCell` — the cell above;
* :class:`DEQTransformerLM` — embedding → DEQ (``model.deq``) → layer norm → output head (tied to
  the token embedding by default), ``model(tokens, **solver_overrides) -> logits (B, T, V)``;
* :class:`UnrolledTransformerLM` / :func:`unrolled_from_deq` — the same parameters, the cell
  applied ``depth`` times from z = 0, differentiated by backpropagation through the layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import DEQ
from .conv import WeightTied

__all__ = ["causal_attention", "TransformerCell", "TokenEmbedding", "DEQTransformerLM", "UnrolledTransformerLM",
           "unrolled_from_deq"]


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) with a causal mask:
    ``out[..., t, :] = Σ_{s ≤ t} softmax_s(q_t·k_s/√d_h) v_s``. Shapes ``(..., T, d_h)``.

    Written with plain operations so that forward-mode AD, double backward and ``vmap`` all have
    rules for it. Where nothing can differentiate the result (no input requires grad, none is a
    ``torch.func`` or forward-mode dual tensor: the DEQ's forward iterations, evaluation) the fused
    ``torch.nn.functional.scaled_dot_product_attention`` computes the same map to rounding
    without materializing the ``(..., T, T)`` scores and weights, which grow as T² (measured on
    the LM's forward pass, batch 16: peak live tensors 8.9 → 6.4 MiB at T = 64, 71 → 25 MiB
    at T = 256)."""
    if not any(_differentiable(t) for t in (q, k, v)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T, dh = q.shape[-2], q.shape[-1]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    # scaled and masked in place (the same operations, so the same values): nothing saves the
    # scores for backward (the product saves q and k, the division a number, the mask its mask),
    # so one (..., T, T) buffer serves all three and only it and the softmax's output are live
    scores = (q @ k.transpose(-1, -2)).div_(math.sqrt(dh)).masked_fill_(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _differentiable(t: Tensor) -> bool:
    """Whether a derivative may flow through ``t``: it requires grad, is a ``torch.func``
    wrapper or a forward-mode dual tensor."""
    return (t.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(t)
            or torch.autograd.forward_ad.unpack_dual(t).tangent is not None)


class TransformerCell(nn.Module):
    """``f(z, x)`` of the module docstring on ``z, x`` of shape ``(B, T, d_model)``.

    ``n_heads`` must divide ``d_model``. Weights are drawn N(0, ``init_std``²) (biases 0): small
    weights keep f contractive at initialization (Bai et al. 2019 initialize small as well)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, init_std: float = 0.02):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        for lin in (self.qkv, self.out, self.ff1, self.ff2):
            nn.init.normal_(lin.weight, 0.0, init_std)
            nn.init.zeros_(lin.bias)

    def attention(self, u: Tensor) -> Tensor:
        """``W_o · CausalMHA(u)`` for ``u`` of shape ``(B, T, d)``."""
        B, T, d = u.shape
        H = self.n_heads
        q, k, v = self.qkv(u).reshape(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)  # each (B, H, T, d/H)
        heads = causal_attention(q, k, v)
        return self.out(heads.transpose(1, 2).reshape(B, T, d))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        h = self.norm1(x + self.attention(z + x))
        return self.norm2(h + self.ff2(F.relu(self.ff1(h))))

    def init_state(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


class TokenEmbedding(nn.Module):
    """Tokens ``(B, T)`` (int64, ``T ≤ max_len``) → ``√d · E[token] + P[t]`` of shape ``(B, T, d)``.

    ``E`` is drawn N(0, 1/d) so that a head tied to it starts with unit-scale logits; the factor
    √d (Vaswani et al. 2017, §3.4) gives the injection unit-scale entries. ``P`` are learned
    absolute positions, N(0, 0.1²)."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.token.weight, 0.0, d_model ** -0.5)
        nn.init.normal_(self.position.weight, 0.0, 0.1)
        self.scale = math.sqrt(d_model)

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[-1]
        if T > self.position.num_embeddings:
            raise ValueError(f"sequence length {T} exceeds the model's max_len {self.position.num_embeddings}")
        return self.scale * self.token(tokens) + self.position.weight[:T]


class _CharLM(nn.Module):
    """Embedding → core (a DEQ or the unrolled cell) → layer norm → head."""

    def __init__(self, core: nn.Module, embed: TokenEmbedding, norm: nn.LayerNorm, head_bias: nn.Parameter,
                 head: nn.Linear | None):
        super().__init__()
        self.embed, self.core, self.norm = embed, core, norm
        self.head = head  # None: tied to the token embedding
        self.head_bias = head_bias

    @property
    def cell(self) -> TransformerCell:
        return self.core.cell

    @property
    def tied(self) -> bool:
        return self.head is None

    def equilibrium(self, tokens: Tensor, **overrides) -> Tensor:
        """The hidden sequence the head reads: z* (DEQ) or z_L (unrolled), ``(B, T, d)``."""
        x = self.embed(tokens).to(self.norm.weight.dtype)
        return self.core(x, **overrides)

    def forward(self, tokens: Tensor, **overrides) -> Tensor:
        """Next-character logits ``(B, T, vocab)`` for ``tokens`` ``(B, T)``."""
        h = self.norm(self.equilibrium(tokens, **overrides))
        weight = self.embed.token.weight if self.head is None else self.head.weight
        return F.linear(h, weight, self.head_bias)


def _parts(vocab_size, d_model, n_heads, d_ff, max_len, init_std, tie_weights):
    embed = TokenEmbedding(vocab_size, d_model, max_len)
    cell = TransformerCell(d_model, n_heads, d_ff, init_std=init_std)
    head = None if tie_weights else nn.Linear(d_model, vocab_size, bias=False)
    return embed, cell, nn.LayerNorm(d_model), nn.Parameter(torch.zeros(vocab_size)), head


class DEQTransformerLM(_CharLM):
    """Character language model whose hidden sequence is the fixed point z* = f(z*, x) of
    :class:`TransformerCell` (Bai, Kolter & Koltun 2019).

    ``tokens (B, T) → logits (B, T, vocab_size)``, ``T ≤ max_len``. ``solver_options`` go to
    ``deqdiff.DEQ`` (defaults: Anderson, relative residual 1e-3, at most 40 iterations; the
    implicit backward solves default to the same tolerance). ``model(tokens, **overrides)``
    passes overrides to the solve; ``model.deq.last_info`` holds its statistics. A solve that
    ends above tolerance warns with its residual (``on_fail``)."""

    def __init__(self, vocab_size: int, *, d_model: int = 64, n_heads: int = 4, d_ff: int = 128, max_len: int = 128,
                 init_std: float = 0.02, tie_weights: bool = True, solver: str = "anderson", tol: float = 1e-3,
                 max_iter: int = 40, **solver_options):
        embed, cell, norm, bias, head = _parts(vocab_size, d_model, n_heads, d_ff, max_len, init_std, tie_weights)
        deq = DEQ(cell, solver=solver, tol=tol, max_iter=max_iter, **solver_options)
        super().__init__(deq, embed, norm, bias, head)

    @property
    def deq(self) -> DEQ:
        return self.core


class UnrolledTransformerLM(_CharLM):
    """The explicit counterpart of :class:`DEQTransformerLM`: the same embedding, cell and head
    with the cell applied ``depth`` times from z = 0 (a weight-tied ``depth``-layer transformer),
    differentiated by backpropagation through every layer. It has no ``deq``."""

    def __init__(self, vocab_size: int, *, depth: int, d_model: int = 64, n_heads: int = 4, d_ff: int = 128,
                 max_len: int = 128, init_std: float = 0.02, tie_weights: bool = True):
        embed, cell, norm, bias, head = _parts(vocab_size, d_model, n_heads, d_ff, max_len, init_std, tie_weights)
        super().__init__(WeightTied(cell, depth), embed, norm, bias, head)

    @property
    def depth(self) -> int:
        return self.core.k


def unrolled_from_deq(model: DEQTransformerLM, depth: int) -> UnrolledTransformerLM:
    """An unrolled network sharing (by reference) every parameter of ``model``: the DEQ's
    forward solve replaced by ``depth`` plain iterations from z = 0 with backpropagation."""
    net = UnrolledTransformerLM.__new__(UnrolledTransformerLM)
    _CharLM.__init__(net, WeightTied(model.cell, depth), model.embed, model.norm, model.head_bias, model.head)
    return net
