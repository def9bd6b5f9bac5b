"""The networks of the grokking experiments (Minegishi et al.; Nanda et al. 2023).

Both read a pair of tokens ``(a, b)`` and return the logits of ``(a ∘ b) mod p``. Every
weight is a bias-free matrix initialised ``N(0, 1/fan_in)`` (plain normal, not
truncated), so magnitude pruning, SNIP, GraSP and SynFlow see every weight as a kernel.

Input: ``(N, 2)`` token ids (any numeric dtype; cast to int32), or ``(N, 2, vocab)``
one-hot (or any soft) rows, which are multiplied into the embedding. The second form is
what SynFlow's all-ones input needs: ``input_shape=(2, vocab)`` in its
:class:`~lottojax.methods.ScoreContext` feeds every token at once, where the first form
would feed token 1 twice. Both give exactly the same logits on one-hot rows.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

fan_in_normal = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
"""``N(0, 1/fan_in)``, the init of the reference code (``torch.randn / sqrt(d_in)``)."""


class TokenEmbed(nn.Module):
    """A ``vocab x features`` embedding (parameter ``embedding``, init ``N(0, 1/vocab)``)
    applied to token ids ``(..., T)`` or to soft rows ``(..., T, vocab)``."""

    vocab: int
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.initializers.normal(1.0 / np.sqrt(self.vocab)),
                           (self.vocab, self.features))
        if x.ndim >= 3:
            return x.astype(table.dtype) @ table
        return jnp.take(table, x.astype(jnp.int32), axis=0)


def _tokens(x: jax.Array, vocab: int) -> jax.Array:
    if x.ndim == 2 and x.shape[-1] == 2:
        return x
    if x.ndim == 3 and x.shape[1:] == (2, vocab):
        return x
    raise ValueError(f"input of shape {x.shape}: expected (N, 2) token ids or (N, 2, {vocab}) one-hot rows")


class GrokMLP(nn.Module):
    """The bias-free embedding MLP of Grokking Tickets (PAPERS.md §6).

    ``logits = relu((E[a] + E[b]) W_in) W_out W_U``: token embedding ``vocab -> embed``
    (``embed/embedding``, ``E``), hidden ``fc0`` ``embed -> hidden`` (``W_in``), ReLU,
    ``fc1`` ``hidden -> embed`` (``W_out``, no activation after it), unembedding
    ``output`` ``embed -> num_classes`` (``W_U``). For ``p = 67`` and the defaults:
    ``67*500 + 500*48 + 48*500 + 500*67 = 115,000`` weights.

    The net is linear on both sides of its ReLU, so by default (``factored=True``) it is
    computed as ``relu((E W_in)[a] + (E W_in)[b]) (W_out W_U)``: the same function and the
    same gradients (up to float rounding), with about a tenth of the FLOPs of a full-batch
    step at ``p = 67`` (``vocab`` rows instead of ``batch`` rows go through the 500-wide
    layers). ``factored=False`` multiplies in the order written above.

    Attributes:
      num_classes: number of logits (``p``).
      embed: embedding width (500).
      hidden: hidden width (48).
      vocab: number of tokens; ``None``: ``num_classes``.
      factored: compute with the products re-associated (see above).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> net = GrokMLP(num_classes=67)
      >>> v = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
      >>> sum(x.size for x in jax.tree.leaves(v))
      115000
    """

    num_classes: int = 67
    embed: int = 500
    hidden: int = 48
    vocab: Optional[int] = None
    factored: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns the logits; ``train`` has no effect."""
        vocab = self.vocab or self.num_classes
        x = _tokens(x, vocab)
        w_e = self.param("embed", lambda k: {"embedding": nn.initializers.normal(1.0 / np.sqrt(vocab))(
            k, (vocab, self.embed))})["embedding"]
        w_in = self.param("fc0", lambda k: {"kernel": fan_in_normal(k, (self.embed, self.hidden))})["kernel"]
        w_out = self.param("fc1", lambda k: {"kernel": fan_in_normal(k, (self.hidden, self.embed))})["kernel"]
        w_u = self.param("output", lambda k: {"kernel": fan_in_normal(k, (self.embed, self.num_classes))})["kernel"]
        if self.factored:  # the same products, associated so that no (batch x embed) array is formed
            table = w_e @ w_in  # (vocab, hidden): row t is E[t] W_in
            h = (x.astype(table.dtype) @ table).sum(axis=1) if x.ndim == 3 else \
                jnp.take(table, x.astype(jnp.int32), axis=0).sum(axis=1)
            return nn.relu(h) @ (w_out @ w_u)
        e = (x.astype(w_e.dtype) @ w_e) if x.ndim == 3 else jnp.take(w_e, x.astype(jnp.int32), axis=0)
        return ((nn.relu(e.sum(axis=1) @ w_in)) @ w_out) @ w_u


class GrokTransformer(nn.Module):
    """A one-layer, bias-free, LayerNorm-free transformer on ``[a, b, =]`` (Nanda et al. 2023).

    The ``=`` token (id ``num_classes``) is appended; the sequence is embedded (``embed``)
    plus a learned positional embedding (``pos_embed``, unless ``positional=False``: the
    reference code leaves it out, which makes the net symmetric in ``a`` and ``b``); one
    causal attention layer (``attn_q``, ``attn_k``, ``attn_v``: ``d_model -> heads *
    d_model/heads``; ``attn_o`` back) and one ReLU MLP (``fc0``, ``fc1``) add to the
    residual stream; the unembedding ``output`` reads the last position.

    Attributes:
      num_classes: number of logits (``p``).
      d_model: residual width (128).
      heads: attention heads (4); must divide ``d_model``.
      d_mlp: MLP width (512).
      positional: learn a positional embedding.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> net = GrokTransformer(num_classes=5, d_model=8, heads=2, d_mlp=16)
      >>> v = net.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
      >>> sorted(v['params']), net.apply(v, jnp.array([[1, 2], [3, 4]])).shape
      (['attn_k', 'attn_o', 'attn_q', 'attn_v', 'embed', 'fc0', 'fc1', 'output', 'pos_embed'], (2, 5))
    """

    num_classes: int = 67
    d_model: int = 128
    heads: int = 4
    d_mlp: int = 512
    positional: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns the logits of the last position; ``train`` has no effect."""
        if self.d_model % self.heads:
            raise ValueError(f"heads={self.heads} must divide d_model={self.d_model}")
        p, vocab = self.num_classes, self.num_classes + 1
        x = _tokens(x, vocab)
        n = x.shape[0]
        equals = jnp.full((n, 1), p, jnp.int32) if x.ndim == 2 else jax.nn.one_hot(jnp.full((n, 1), p), vocab)
        sequence = jnp.concatenate([x.astype(equals.dtype), equals], axis=1)
        h = TokenEmbed(vocab, self.d_model, name="embed")(sequence)  # (n, 3, d)
        if self.positional:
            h = h + self.param("pos_embed", nn.initializers.normal(1.0 / np.sqrt(self.d_model)), (3, self.d_model))
        dense = lambda width, name: nn.Dense(width, use_bias=False, kernel_init=fan_in_normal, name=name)
        d_head = self.d_model // self.heads
        split = lambda t: t.reshape(n, 3, self.heads, d_head)
        q, k, v = (split(dense(self.d_model, f"attn_{c}")(h)) for c in "qkv")
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(d_head)
        causal = jnp.tril(jnp.ones((3, 3), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        z = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, 3, self.d_model)
        h = h + dense(self.d_model, "attn_o")(z)
        h = h + dense(self.d_model, "fc1")(nn.relu(dense(self.d_mlp, "fc0")(h)))
        return dense(p, "output")(h[:, -1])
