"""Token-level losses for language modelling: `cross_entropy` on logits, and
`chunked_cross_entropy`, the same from hidden states without materialising all logits."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

Array = jax.Array


def cross_entropy(logits: Array, targets: Array, weights: Array | None = None) -> dict[str, Array]:
    """Weighted next-token cross-entropy.

    Args:
      logits: [batch, length, vocab] (any float dtype; computed in float32).
      targets: [batch, length] int token ids.
      weights: [batch, length] loss weights (e.g. 1 on target tokens only); None means all ones.

    Returns:
      {'loss': weighted mean, 'loss_sum', 'weight_sum', 'correct_sum'}: sums let callers
      average exactly over micro-batches and devices.
    """
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    loss_sum = _nll_sum(logits, targets, weights)
    weight_sum = jnp.sum(weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss": loss_sum / jnp.maximum(weight_sum, 1.0),
        "loss_sum": loss_sum,
        "weight_sum": weight_sum,
        "correct_sum": jnp.sum(correct * weights),
    }


def _nll(logits: Array, targets: Array) -> tuple[Array, Array]:
    """(negative log-likelihood of each target, log-partition) in float32, [batch, length]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


@jax.custom_vjp
def _nll_sum(logits: Array, targets: Array, weights: Array) -> Array:
    """sum(weights x nll): float32 math on logits of any float dtype. Its gradient with
    respect to the logits is written out, (softmax - one_hot(targets)) x weights, one
    elementwise pass in the logits' dtype: differentiated automatically, the gather of the
    target logit becomes a scatter into float32 zeros of the logits' shape, and the float32
    copy of the logits a second pass and buffer. Reverse mode only, as any custom VJP:
    `jax.jvp` through the loss is refused by jax."""
    return jnp.sum(_nll(logits, targets)[0] * weights)


def _nll_sum_fwd(logits, targets, weights):
    nll, log_z = _nll(logits, targets)
    return jnp.sum(nll * weights), (logits, targets, weights, nll, log_z)


def _nll_sum_bwd(res, g):
    logits, targets, weights, nll, log_z = res
    probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
    ids = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    one_hot = (ids == targets[..., None]).astype(jnp.float32)
    dlogits = (probs - one_hot) * (g * weights)[..., None]
    dtargets = np.zeros(targets.shape, jax.dtypes.float0)  # integer ids: no gradient
    return dlogits.astype(logits.dtype), dtargets, (g * nll).astype(weights.dtype)


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def chunked_cross_entropy(h: Array, head_fn: Callable[[Array], Array], targets: Array,
                          weights: Array | None = None, *, chunk: int) -> dict[str, Array]:
    """`cross_entropy(head_fn(h), targets, weights)` without [batch, length, vocab] logits.

    The sequence is cut into chunks of `chunk` positions and scanned; each step applies
    `head_fn` to one chunk and keeps only the chunk's sums, so at most [batch, chunk, vocab]
    logits are live. Differentiated, the scan computes each chunk's gradient in the same pass
    (a custom VJP, `_fused_chunk_loss`): the gradient of the loss sum with respect to h and,
    where they are differentiated, to the parameters `head_fn` closes over, while the chunk's
    logits are at hand. The backward pass only scales those by the incoming cotangent: the
    output layer runs once forward and once backward, as without chunks (no second forward
    of a rematerialised chunk), and nothing larger than h's gradient is kept.

    Args:
      h: [batch, length, embed] final hidden states (what the output layer reads).
      head_fn: [batch, chunk, embed] -> [batch, chunk, vocab] logits, e.g. final norm and
        output layer (`lambda x: model.apply(variables, x, method=Decoder.head)`); it may
        close over parameters, which receive their gradients (`jax.closure_convert` makes
        them explicit inputs of the custom VJP). Frozen ones (not differentiated) get no
        weight-gradient product.
      targets: [batch, length] int token ids.
      weights: [batch, length] loss weights; None means all ones. Not differentiated.
      chunk: positions per step; a length that is not a multiple is padded with zero weight.

    Returns:
      The same dict as `cross_entropy`: {'loss', 'loss_sum', 'weight_sum', 'correct_sum'}.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    b, t = targets.shape
    if h.shape[:2] != (b, t):
        raise ValueError(f"h: expected [batch, length, embed] with batch, length = {(b, t)} "
                         f"(the targets'), got shape {h.shape}")
    if weights is None:
        weights = jnp.ones((b, t), jnp.float32)
    weights = weights.astype(jnp.float32)
    chunk = min(chunk, t)
    pad = -t % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    head, consts = jax.closure_convert(head_fn, h[:, :chunk])
    loss_sum, correct_sum = _fused_chunk_loss(head, chunk, h, weights, targets, *consts)
    weight_sum = jnp.sum(weights)
    return {
        "loss": loss_sum / jnp.maximum(weight_sum, 1.0),
        "loss_sum": loss_sum,
        "weight_sum": weight_sum,
        "correct_sum": correct_sum,
    }


def _chunks(chunk: int, *xs: Array) -> tuple[Array, ...]:
    """Each [batch, n * chunk, ...] x as [n, batch, chunk, ...] (the scan's leading axis)."""
    return tuple(jnp.swapaxes(x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:]),
                              0, 1) for x in xs)


def _unchunk(x: Array) -> Array:
    """[n, batch, chunk, ...] -> [batch, n * chunk, ...]."""
    n, b, c = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _chunk_sums(head, h_c, weights_c, targets_c, consts) -> tuple[Array, Array]:
    """(loss sum, correct sum) of one chunk's logits `head(h_c, *consts)`."""
    m = cross_entropy(head(h_c, *consts), targets_c, weights_c)
    return m["loss_sum"], m["correct_sum"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_chunk_loss(head, chunk, h, weights, targets, *consts):
    """(loss sum, correct sum) over every chunk of h; `consts` are what `head` closed over.
    Not differentiated: a scan of the sums alone."""
    def body(carry, xs):
        loss, correct = _chunk_sums(head, *xs, consts)
        return (carry[0] + loss, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(body, (zero, zero), _chunks(chunk, h, weights, targets))
    return sums


def _fused_chunk_loss_fwd(head, chunk, h, weights, targets, *consts):
    """The sums, and in the same scan d(loss sum)/dh per chunk and d(loss sum)/dc summed
    over chunks for each const c that is differentiated (`perturbed`); none for the others,
    so a frozen output layer costs no weight-gradient product."""
    h, weights, targets = h.value, weights.value, targets.value
    trained = tuple(bool(c.perturbed) for c in consts)
    values = tuple(c.value for c in consts)

    def body(carry, xs):
        loss_acc, correct_acc, grads_acc = carry
        h_c, weights_c, targets_c = xs

        def sums(h_c, live):
            it = iter(live)
            full = tuple(next(it) if p else v for v, p in zip(values, trained))
            return _chunk_sums(head, h_c, weights_c, targets_c, full)

        live = tuple(v for v, p in zip(values, trained) if p)
        loss, vjp, correct = jax.vjp(sums, h_c, live, has_aux=True)
        dh_c, dlive = vjp(jnp.ones((), loss.dtype))
        grads_acc = tuple(a + g.astype(a.dtype) for a, g in zip(grads_acc, dlive))
        return (loss_acc + loss, correct_acc + correct, grads_acc), dh_c

    zero = jnp.zeros((), jnp.float32)
    grads0 = tuple(jnp.zeros(v.shape, v.dtype) for v, p in zip(values, trained) if p)
    (loss, correct, grads), dh = jax.lax.scan(body, (zero, zero, grads0),
                                              _chunks(chunk, h, weights, targets))
    it = iter(grads)  # one entry per const: its summed gradient, or None where frozen
    return (loss, correct), (_unchunk(dh), tuple(next(it) if p else None for p in trained))


def _fused_chunk_loss_bwd(head, chunk, res, cotangents):
    dh, grads = res
    g = cotangents[0]  # the correct sum is a count: its cotangent is ignored
    if isinstance(g, SymbolicZero):
        g = jnp.zeros((), jnp.float32)
    dconsts = tuple(None if d is None else (g * d).astype(d.dtype) for d in grads)
    return ((g * dh).astype(dh.dtype), None, None, *dconsts)


_fused_chunk_loss.defvjp(_fused_chunk_loss_fwd, _fused_chunk_loss_bwd, symbolic_zeros=True)
