"""Matrix-free curvature-vector products: Hessian, Gauss-Newton (= Fisher), empirical Fisher.

Implements, on :mod:`torch.func`, the products that Hessian-free / Newton-CG methods and
CurveBall multiply by, without ever forming a matrix:

- Hessian-vector product ``H v = ∇_θ (∇_θ L(θ) · v)`` (Pearlmutter 1994, "Fast exact
  multiplication by the Hessian"; the "Pearlmutter matvec" of Reiz et al. 2022, "Training
  Large-Scale Neural Networks with a Newton Conjugate Gradient Method").
- Generalised Gauss-Newton product ``G v = Jᵀ H_L J v`` (Schraudolph 2002, "Fast curvature
  matrix-vector products for second-order gradient descent", Sec. 3): ``J v`` forward through
  the network, the loss Hessian ``H_L`` w.r.t. the outputs in closed form, ``Jᵀ`` backward.
- Fisher product: for the three canonical losses here (softmax cross-entropy, Gaussian MSE,
  Bernoulli on logits) the outputs are the natural parameters of an exponential family, so the
  true Fisher *equals* the GGN (Martens 2014, "New insights and perspectives on the natural
  gradient method", Sec. 9.2) and ``fisher`` is the GGN product. The product that differs is the
  *empirical* Fisher ``F̂ v = (1/N) Σ_n g_n g_nᵀ v`` with per-example gradients ``g_n = ∇_θ ℓ_n``
  at the observed targets (``empirical_fisher``).

Symbols: ``θ`` parameters, ``v`` a vector shaped like ``θ``, ``z = f(θ, x)`` outputs of ``N``
examples, ``L = (1/N) Σ_n ℓ_n`` the batch loss of :mod:`secondorder.optim.losses`, ``J = ∂z/∂θ``,
``H_L = ∂²L/∂z²``, ``p = softmax(z)``, ``σ = sigmoid(z)``, ``C`` any of the curvatures.

Conventions:

- A parameter vector is a :data:`Params` dict ``{name: tensor}`` in ``model.named_parameters()``
  order, restricted to the optimised parameters (:func:`params_by_name`); model parameters not in
  the dict are held fixed. :func:`flatten`, :func:`unflatten` and :func:`dot` convert/combine.
- A batch is ``(inputs, targets)``. Every product is the curvature of the loss exactly as reduced
  by :func:`~secondorder.optim.losses.loss_value` (mean over the batch; mean over output elements
  for ``mse``/``bernoulli``), in the parameters' dtype (no autocast).
- Curvature forwards never touch batch-norm running statistics (train-mode batch statistics are
  still used: the curvature is that of the training-mode function).
- The pure ``*_vector_product`` functions rebuild everything per call. In an optimizer step build
  one :class:`CurvatureOperator`: it caches the per-step linearisation (the gradient graph for the
  Hessian; the outputs, their ``vjp`` and ``H_L`` for the GGN), averages over micro-batches and
  all-reduces each product over ranks in one collective.

Measured (cnn1d, batch 256, float32, one CPU thread; per product, in gradients = one
forward+backward): cached reverse-over-reverse HVP ~2.0-2.2, forward-over-reverse ~4.1-4.8 (it
cannot reuse anything between products), hence :data:`DEFAULT_HVP_MODE`; cached GGN product
~1.6-2.1 (~1.2-1.5 with ``jvp_mode="linearize"``, whose one-off trace costs ~20-35 gradients).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, linearize, vjp, vmap

from secondorder.optim.closure import frozen_norm_statistics
from secondorder.optim.losses import LossKind, loss_value

Params = dict[str, Tensor]
"""A parameter-shaped vector ``{name: tensor}`` in ``model.named_parameters()`` order."""
Batch = tuple[Tensor, Tensor]
"""``(inputs, targets)``."""
CurvatureKind = Literal["hessian", "ggn", "fisher", "empirical_fisher"]
CURVATURE_KINDS: tuple[str, ...] = get_args(CurvatureKind)
HvpMode = Literal["reverse_over_reverse", "forward_over_reverse"]
HVP_MODES: tuple[str, ...] = get_args(HvpMode)
DEFAULT_HVP_MODE: HvpMode = "reverse_over_reverse"
JvpMode = Literal["jvp", "linearize"]


# -- parameter vectors ----------------------------------------------------------------------------


def params_by_name(model: nn.Module, params: Iterable[Tensor] | None = None) -> Params:
    """The optimised parameters as a detached :data:`Params` dict, in model order.

    Args:
        model: the network.
        params: the optimised parameters (e.g. from ``param_groups``); ``None``: every parameter
            with ``requires_grad``.

    Returns:
        ``{name: p.detach()}`` (sharing storage with the parameters).

    Raises:
        ValueError: if a parameter in ``params`` is not a parameter of ``model``.
    """
    named = list(model.named_parameters())
    if params is None:
        return {name: p.detach() for name, p in named if p.requires_grad}
    wanted = {id(p) for p in params}
    out = {name: p.detach() for name, p in named if id(p) in wanted}
    if len(out) != len(wanted):
        raise ValueError(
            f"{len(wanted) - len(out)} optimised parameter(s) are not parameters of the model "
            f"{type(model).__name__}; curvature products need model parameters"
        )
    return out


def flatten(vector: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a :data:`Params` vector into one 1-D tensor (dict order)."""
    return torch.cat([t.reshape(-1) for t in vector.values()])


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Views of a 1-D tensor shaped like ``like`` (inverse of :func:`flatten`)."""
    sizes = [t.numel() for t in like.values()]
    if sum(sizes) != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} elements, the parameters {sum(sizes)}")
    pieces = torch.split(flat, sizes)
    return {
        name: piece.view_as(ref) for (name, ref), piece in zip(like.items(), pieces, strict=True)
    }


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """``aᵀb`` over two :data:`Params` vectors as a 0-d tensor (no host sync)."""
    return torch.stack([torch.vdot(x.reshape(-1), b[k].reshape(-1)) for k, x in a.items()]).sum()


def curvature_batches(batches: Sequence[Batch], fraction: float) -> list[Batch]:
    """The curvature batch: the leading ``ceil(fraction · size)`` examples of each micro-batch.

    Martens 2010 (Sec. 4.3) computes curvature on a subsample of the gradient batch. The sampler
    already shuffles, so leading examples are a random subsample; the same count from every
    micro-batch keeps them equal-sized, so the mean of per-micro-batch products is the product
    on the whole curvature batch.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"Invalid curvature_batch_fraction: {fraction} (need 0 < f <= 1)")
    keep = [max(1, math.ceil(fraction * x.shape[0])) for x, _ in batches]
    return [(x[:k], y[:k]) for (x, y), k in zip(batches, keep, strict=True)]


def all_reduce_vectors(vectors: Sequence[Tensor], comm: Any, *, bucket_mb: float = 25.0) -> int:
    """Average tensors over ranks in place in one bucketed collective; returns bytes sent."""
    if comm is None or comm.world_size == 1:
        return 0
    comm.all_reduce_tensors(list(vectors), op="avg", bucket_mb=bucket_mb)
    return sum(t.numel() * t.element_size() for t in vectors)


# -- the functional model and loss ----------------------------------------------------------------


def model_outputs(model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
    """``z = f(θ, x)``: the model called functionally at ``params`` (others at their values)."""
    with frozen_norm_statistics(model):
        return functional_call(model, dict(params), (inputs,), strict=False)


def batch_loss(loss_kind: LossKind, outputs: Tensor, targets: Tensor) -> Tensor:
    """``L(z, y)`` of :func:`~secondorder.optim.losses.loss_value`, in float32 or float64."""
    if outputs.dtype not in (torch.float32, torch.float64):
        outputs = outputs.float()
    return loss_value(loss_kind, outputs, targets)


def _loss_fn(model: nn.Module, batch: Batch, loss_kind: LossKind) -> Callable[[Params], Tensor]:
    inputs, targets = batch
    return lambda params: batch_loss(loss_kind, model_outputs(model, params, inputs), targets)


def loss_and_gradient(
    model: nn.Module, params: Params, batch: Batch, loss_kind: LossKind
) -> tuple[Tensor, Params]:
    """``(L, ∇_θ L)`` on one batch, detached, without touching ``.grad``."""
    g, loss = grad_and_value(_loss_fn(model, batch, loss_kind))(params)
    return loss.detach(), g


def output_hessian(loss_kind: LossKind, outputs: Tensor) -> Callable[[Tensor], Tensor]:
    """``u ↦ H_L u`` with ``H_L = ∂²L/∂z²`` in closed form, matching ``loss_value``'s reduction.

    ``M`` is the number of terms ``L`` averages over: ``N`` times any spatial positions for
    cross-entropy (classes on dim 1), every output element for ``mse``/``bernoulli``.

    - ``cross_entropy``: ``(1/M)(p ⊙ u − p (pᵀu))`` per position, i.e. ``diag(p) − ppᵀ``.
    - ``mse``: ``(2/M) u``, since ``L = mean((z − y)²)``.
    - ``bernoulli``: ``(1/M) σ(1 − σ) ⊙ u``.

    None depends on the targets; each is positive semi-definite, hence so is ``G``.
    """
    z = outputs.detach()
    if loss_kind == "cross_entropy":
        p, m = torch.softmax(z, dim=1), z.numel() // z.shape[1]
        return lambda u: (p * u - p * (p * u).sum(dim=1, keepdim=True)) / m
    if loss_kind == "mse":
        return lambda u: u * (2.0 / z.numel())
    if loss_kind == "bernoulli":
        s = torch.sigmoid(z)
        w = s * (1.0 - s) / z.numel()
        return lambda u: w * u
    raise ValueError(f"Unknown loss kind {loss_kind!r}")


def empirical_fisher_cotangent(output_gradient: Tensor, jv: Tensor) -> Tensor:
    """The output cotangent ``e_n (e_nᵀ (J v)_n) / N`` of ``F̂ v = Jᵀ[...]``.

    ``g_n = J_nᵀ e_n`` with ``e_n = ∂ℓ_n/∂z_n = N ∂L/∂z_n``, so no per-example gradient is formed.
    """
    n = output_gradient.shape[0]
    e = output_gradient * n
    s = (e * jv).flatten(1).sum(1)
    return e * s.view(-1, *([1] * (e.dim() - 1))) / n


def _output_gradient(loss_kind: LossKind, outputs: Tensor, targets: Tensor) -> Tensor:
    return grad(lambda z: batch_loss(loss_kind, z, targets))(outputs.detach())


# -- pure products (rebuilt per call) -------------------------------------------------------------


def hessian_vector_product(
    model: nn.Module,
    params: Params,
    batch: Batch,
    loss_kind: LossKind,
    vector: Params,
    *,
    mode: HvpMode = DEFAULT_HVP_MODE,
) -> Params:
    """``H v = ∇_θ (∇_θ L · v)`` on one batch (Pearlmutter 1994).

    ``mode``: ``reverse_over_reverse`` (``vjp`` of the gradient, i.e. double backward) or
    ``forward_over_reverse`` (``jvp`` of the gradient).
    """
    loss = _loss_fn(model, batch, loss_kind)
    if mode == "forward_over_reverse":
        return jvp(grad(loss), (params,), (vector,))[1]
    if mode == "reverse_over_reverse":
        return vjp(grad(loss), params)[1](vector)[0]
    raise ValueError(f"Invalid hvp_mode: {mode!r}; choose one of {', '.join(HVP_MODES)}")


def ggn_vector_product(
    model: nn.Module, params: Params, batch: Batch, loss_kind: LossKind, vector: Params
) -> Params:
    """``G v = Jᵀ H_L J v`` on one batch (Schraudolph 2002): ``jvp``, closed-form ``H_L``, vjp."""
    f = _forward_fn(model, batch[0])
    outputs, vjp_fn = vjp(f, params)
    return vjp_fn(output_hessian(loss_kind, outputs)(jvp(f, (params,), (vector,))[1]))[0]


def fisher_vector_product(
    model: nn.Module, params: Params, batch: Batch, loss_kind: LossKind, vector: Params
) -> Params:
    """``F v``, equal to ``G v`` for these canonical losses (module docstring)."""
    return ggn_vector_product(model, params, batch, loss_kind, vector)


def empirical_fisher_vector_product(
    model: nn.Module, params: Params, batch: Batch, loss_kind: LossKind, vector: Params
) -> Params:
    """``F̂ v = (1/N) Σ_n g_n (g_nᵀ v)`` at the observed targets: one ``jvp`` and one ``vjp``."""
    f = _forward_fn(model, batch[0])
    outputs, vjp_fn = vjp(f, params)
    dz = _output_gradient(loss_kind, outputs, batch[1])
    return vjp_fn(empirical_fisher_cotangent(dz, jvp(f, (params,), (vector,))[1]))[0]


def _forward_fn(model: nn.Module, inputs: Tensor) -> Callable[[Params], Tensor]:
    return lambda params: model_outputs(model, params, inputs)


def empirical_fisher_diagonal(
    model: nn.Module,
    params: Params,
    batches: Sequence[Batch],
    loss_kind: LossKind,
    *,
    chunk_size: int = 64,
) -> Tensor:
    """``(1/N) Σ_n g_n ⊙ g_n`` over the curvature batch, flat (for Martens' preconditioner).

    Per-example gradients come from ``vmap(grad)`` in chunks of ``chunk_size`` examples. With
    train-mode batch norm the examples interact through batch statistics, so per-example
    gradients do not exist; there the batch-gradient approximation ``mean_b ḡ_b ⊙ ḡ_b`` (squared
    micro-batch gradients) is used instead — an underestimate of the noise part, documented.
    """
    has_batch_norm = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )
    total = None
    for inputs, targets in batches:
        if has_batch_norm:
            square = flatten(loss_and_gradient(model, params, (inputs, targets), loss_kind)[1]) ** 2
        else:

            def example_loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
                z = model_outputs(model, p, x.unsqueeze(0))
                return batch_loss(loss_kind, z, y.unsqueeze(0))

            per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
            grads = per_example(params, inputs, targets)
            square = torch.cat([g.pow(2).mean(0).reshape(-1) for g in grads.values()])
        total = square if total is None else total + square
    return total / len(batches)


# -- the per-step operator ------------------------------------------------------------------------


class CurvatureOperator:
    """``v ↦ C v`` at fixed ``θ``, averaged over micro-batches and ranks, linearised once.

    Built once per optimizer step; CG then calls it many times. Per micro-batch it caches:

    - ``hessian`` (reverse-over-reverse): the graph of ``∇_θ L`` (``vjp`` of ``grad_and_value``),
      so each product is one double-backward pass and ``(L, ∇L)`` come for free.
    - ``ggn`` / ``fisher`` / ``empirical_fisher``: the outputs ``z``, their ``vjp`` (so ``Jᵀ``
      never reruns the forward), ``H_L`` (or ``∂L/∂z``); ``J v`` is a ``jvp`` per product, or the
      traced linearisation with ``jvp_mode="linearize"`` (pays off after ~40 products).

    Products are the mean over micro-batches of per-micro-batch products (all equal-sized, so
    the product on their union), then averaged over ranks through ``comm`` in one bucketed
    all-reduce: exact data parallelism. With ``cache=False`` nothing is kept between products
    (memory of one micro-batch; the forward reruns per product).

    Args:
        model: the network.
        params: the point ``θ`` (:func:`params_by_name`).
        batches: this rank's curvature micro-batches.
        loss_kind: the loss.
        curvature: ``hessian``, ``ggn``, ``fisher`` (= ``ggn``) or ``empirical_fisher``.
        hvp_mode: Hessian product mode (see :func:`hessian_vector_product`).
        jvp_mode: ``jvp`` or ``linearize`` for the GGN's ``J v``.
        comm: communicator (``None``: one process).
        cache: keep the per-micro-batch linearisation.
        bucket_mb: all-reduce bucket size for :meth:`__call__`.

    Attributes:
        products: curvature products computed so far.
        comm_bytes: bytes all-reduced so far.
        outputs: per micro-batch ``z`` (GGN kinds with ``cache``), for CurveBall-style updates.
        losses, gradients: per micro-batch ``L`` and ``∇_θ L`` on the curvature batch, free by-
            products of the cached reverse-over-reverse Hessian (local: not all-reduced).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        params: Params,
        batches: Sequence[Batch],
        loss_kind: LossKind,
        curvature: CurvatureKind = "ggn",
        hvp_mode: HvpMode = DEFAULT_HVP_MODE,
        jvp_mode: JvpMode = "jvp",
        comm: Any = None,
        cache: bool = True,
        bucket_mb: float = 25.0,
    ):
        if curvature not in CURVATURE_KINDS:
            raise ValueError(f"Invalid curvature: {curvature!r}; choose {CURVATURE_KINDS}")
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"Invalid hvp_mode: {hvp_mode!r}; choose one of {HVP_MODES}")
        if jvp_mode not in get_args(JvpMode):
            raise ValueError(f"Invalid jvp_mode: {jvp_mode!r}; choose jvp or linearize")
        if not batches:
            raise ValueError("CurvatureOperator needs at least one batch")
        self.model, self.params, self.batches = model, params, list(batches)
        self.loss_kind, self.curvature, self.hvp_mode = loss_kind, curvature, hvp_mode
        self.jvp_mode, self.comm, self.cache, self.bucket_mb = jvp_mode, comm, cache, bucket_mb
        self.products = 0
        self.comm_bytes = 0
        self.outputs: list[Tensor] = []
        self.losses: list[Tensor] = []
        self.gradients: list[Params] = []
        self._vjp_fns: list[Callable[..., Any]] = []
        self._jvp_fns: list[Callable[[Params], Tensor]] = []
        self._output_ops: list[Callable[[Tensor], Tensor]] = []
        if cache:
            self._linearise()

    def _linearise(self) -> None:
        for inputs, targets in self.batches:
            if self.curvature == "hessian":
                if self.hvp_mode == "reverse_over_reverse":
                    loss = _loss_fn(self.model, (inputs, targets), self.loss_kind)
                    g, hvp_fn, value = vjp(grad_and_value(loss), self.params, has_aux=True)
                    self._vjp_fns.append(hvp_fn)
                    self.losses.append(value.detach())
                    self.gradients.append({k: t.detach() for k, t in g.items()})
                continue
            f = _forward_fn(self.model, inputs)
            z, vjp_fn = vjp(f, self.params)
            self.outputs.append(z.detach())
            self._vjp_fns.append(vjp_fn)
            if self.jvp_mode == "linearize":
                with warnings.catch_warnings():  # torch's tracer warns about its own constants
                    warnings.simplefilter("ignore")
                    self._jvp_fns.append(linearize(f, self.params)[1])
            else:
                self._jvp_fns.append(lambda v, f=f: jvp(f, (self.params,), (v,))[1])
            if self.curvature == "empirical_fisher":
                dz = _output_gradient(self.loss_kind, z, targets)
                self._output_ops.append(lambda u, dz=dz: empirical_fisher_cotangent(dz, u))
            else:
                self._output_ops.append(output_hessian(self.loss_kind, z))

    def _product(self, i: int, vector: Params) -> Params:
        if not self.cache:
            return _PURE[self.curvature](
                self.model, self.params, self.batches[i], self.loss_kind, vector, self.hvp_mode
            )
        if self.curvature == "hessian":
            if self.hvp_mode == "forward_over_reverse":
                loss = _loss_fn(self.model, self.batches[i], self.loss_kind)
                return jvp(grad(loss), (self.params,), (vector,))[1]
            return self._vjp_fns[i](vector)[0]
        return self._vjp_fns[i](self._output_ops[i](self._jvp_fns[i](vector)))[0]

    def local_matvec(self, flat: Tensor) -> Tensor:
        """``C_r v`` on this rank's curvature batch only (flat in, flat out; no collective)."""
        vector = unflatten(flat, self.params)
        total = flatten(self._product(0, vector))
        for i in range(1, len(self.batches)):
            total += flatten(self._product(i, vector))
        self.products += 1
        return total / len(self.batches) if len(self.batches) > 1 else total

    def matvec(self, flat: Tensor) -> Tensor:
        """``C v`` on the global curvature batch: flat in, flat out, one all-reduce."""
        out = self.local_matvec(flat)
        self.comm_bytes += all_reduce_vectors([out], self.comm)
        return out

    def __call__(self, vector: Params) -> Params:
        """``C v`` on the global curvature batch, as a :data:`Params` dict."""
        return unflatten(self.matvec(flatten(vector)), self.params)

    # -- the pieces of a GGN product, for methods that fuse them (CurveBall) --------------------

    def jacobian_vector_products(self, vector: Params) -> list[Tensor]:
        """``J_i v`` per micro-batch ``i`` (GGN kinds, ``cache=True``)."""
        return [fn(vector) for fn in self._jvp_fns]

    def output_hessian_products(self, us: Sequence[Tensor]) -> list[Tensor]:
        """``H_L,i u_i`` per micro-batch (the empirical-Fisher cotangent for that kind)."""
        return [op(u) for op, u in zip(self._output_ops, us, strict=True)]

    def transposed_jacobian_products(self, cotangents: Sequence[Tensor]) -> Params:
        """``mean_i J_iᵀ w_i`` on this rank (no collective), as :data:`Params`."""
        total = flatten(self._vjp_fns[0](cotangents[0])[0])
        for fn, w in zip(self._vjp_fns[1:], cotangents[1:], strict=True):
            total += flatten(fn(w)[0])
        return unflatten(total / len(cotangents), self.params)


def _hvp_pure(model, params, batch, loss_kind, vector, mode):  # noqa: ANN001, ANN202
    return hessian_vector_product(model, params, batch, loss_kind, vector, mode=mode)


_PURE: dict[str, Callable[..., Params]] = {
    "hessian": _hvp_pure,
    "ggn": lambda m, p, b, k, v, _: ggn_vector_product(m, p, b, k, v),
    "fisher": lambda m, p, b, k, v, _: fisher_vector_product(m, p, b, k, v),
    "empirical_fisher": lambda m, p, b, k, v, _: empirical_fisher_vector_product(m, p, b, k, v),
}
