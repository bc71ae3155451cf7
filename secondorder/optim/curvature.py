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

- A parameter vector is a :data:`~secondorder.optim.flat.Params` dict ``{name: tensor}`` in
  ``model.named_parameters()`` order, restricted to the optimised parameters
  (:func:`~secondorder.optim.flat.params_by_name`); model parameters not in the dict are held
  fixed. :mod:`secondorder.optim.flat` converts between the dict, list and flat forms.
- A batch is ``(inputs, targets)``. Every product is the curvature of the loss exactly as reduced
  by :func:`~secondorder.optim.losses.loss_value` (mean over the batch; mean over output elements
  for ``mse``/``bernoulli``), in the parameters' dtype (no autocast).
- Curvature forwards never touch batch-norm running statistics (train-mode batch statistics are
  still used: the curvature is that of the training-mode function). The network and loss as
  functions of ``θ`` and the output-space derivatives are :mod:`secondorder.optim.functional`'s.
- The pure ``*_vector_product`` functions rebuild everything per call. In an optimizer step build
  one :class:`CurvatureOperator`: it caches the per-step linearisation (the gradient graph for the
  Hessian; the outputs, their ``vjp`` and ``H_L`` for the GGN), averages over micro-batches and
  all-reduces each product over ranks in one collective. Its
  :meth:`~CurvatureOperator.model_gradient` is the fused ``G t + ∇L`` of one forward and one
  backward (CurveBall's step).

Measured (cnn1d, batch 256, float32, one CPU thread; per product, in gradients = one
forward+backward): cached reverse-over-reverse HVP ~2.0-2.2, forward-over-reverse ~4.1-4.8 (it
cannot reuse anything between products), hence :data:`DEFAULT_HVP_MODE`; cached GGN product
~1.6-2.1 (~1.2-1.5 with ``jvp_mode="linearize"``, whose one-off trace costs ~20-35 gradients).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, jvp, linearize, vjp

from secondorder.distributed.communicator import BUCKET_MB
from secondorder.optim.flat import Params, dot, flatten, params_by_name, unflatten
from secondorder.optim.functional import (
    CURVATURE_KINDS,
    DEFAULT_HVP_MODE,
    HVP_MODES,
    Batch,
    CurvatureKind,
    HvpMode,
    OutputTerms,
    batch_loss,
    empirical_fisher_cotangent,
    empirical_fisher_diagonal,
    empirical_fisher_vector_product,
    fisher_vector_product,
    forward_function,
    forward_jvp,
    fused_ggn_pass,
    ggn_vector_product,
    hessian_vector_product,
    loss_and_gradient,
    loss_function,
    model_outputs,
    output_gradient,
    output_hessian,
    vector_product,
)
from secondorder.optim.losses import LossKind

# With what it builds on (flat.py, functional.py), re-exported: one import for its callers.
__all__ = [
    "CURVATURE_KINDS",
    "DEFAULT_HVP_MODE",
    "HVP_MODES",
    "Batch",
    "CurvatureKind",
    "CurvatureOperator",
    "HvpMode",
    "JvpMode",
    "Params",
    "all_reduce_vectors",
    "batch_loss",
    "curvature_batches",
    "dot",
    "empirical_fisher_diagonal",
    "empirical_fisher_vector_product",
    "fisher_vector_product",
    "flatten",
    "ggn_vector_product",
    "hessian_vector_product",
    "loss_and_gradient",
    "mean_loss",
    "model_outputs",
    "output_hessian",
    "params_by_name",
    "unflatten",
]

JvpMode = Literal["jvp", "linearize"]


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


def all_reduce_vectors(
    vectors: Sequence[Tensor], comm: Any, *, bucket_mb: float = BUCKET_MB
) -> None:
    """Average tensors over ranks in place in one bucketed collective; ``comm.stats`` counts it."""
    if comm is None or comm.world_size == 1:
        return
    comm.all_reduce_tensors(list(vectors), op="avg", bucket_mb=bucket_mb)


def mean_loss(
    model: nn.Module, params: Params, batches: Sequence[Batch], loss_kind: LossKind, comm: Any
) -> Tensor:
    """``L(θ)`` on the global batch by forwards only: the mean over micro-batches and ranks.

    In the parameters' dtype without autocast, like the curvature products (a loss change
    computed this way is not swamped by autocast rounding).
    """
    losses = [batch_loss(loss_kind, model_outputs(model, params, x), y) for x, y in batches]
    loss = torch.stack(losses).mean().reshape(1)
    all_reduce_vectors([loss], comm)
    return loss[0]


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
        bucket_mb: all-reduce bucket size of the products.

    Attributes:
        products: curvature products computed so far (their all-reduces are counted in
            ``comm.stats``).
        losses: per micro-batch ``L`` on the curvature batch (local: not all-reduced), a free
            by-product of the cached reverse-over-reverse Hessian and of :meth:`model_gradient`.
        gradients: per micro-batch ``∇_θ L``, a by-product of the cached Hessian (local).
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
        bucket_mb: float = BUCKET_MB,
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
        self.losses: list[Tensor] = []
        self.gradients: list[Params] = []
        self._vjp_fns: list[Callable[..., Any]] = []
        self._jvp_fns: list[Callable[[Params], Tensor]] = []
        self._output_ops: list[Callable[[Tensor], Tensor]] = []
        self._terms: list[OutputTerms] = []
        if cache:
            self._linearise()

    def _linearise(self) -> None:
        for inputs, targets in self.batches:
            if self.curvature == "hessian":
                if self.hvp_mode == "reverse_over_reverse":
                    loss = loss_function(self.model, (inputs, targets), self.loss_kind)
                    g, hvp_fn, value = vjp(grad_and_value(loss), self.params, has_aux=True)
                    self._vjp_fns.append(hvp_fn)
                    self.losses.append(value.detach())
                    self.gradients.append({k: t.detach() for k, t in g.items()})
                continue
            f = forward_function(self.model, inputs)
            z, vjp_fn = vjp(f, self.params)
            self._vjp_fns.append(vjp_fn)
            if self.jvp_mode == "linearize":
                with warnings.catch_warnings():  # torch's tracer warns about its own constants
                    warnings.simplefilter("ignore")
                    self._jvp_fns.append(linearize(f, self.params)[1])
            else:
                self._jvp_fns.append(lambda v, f=f: jvp(f, (self.params,), (v,))[1])
            if self.curvature == "empirical_fisher":
                dz = output_gradient(self.loss_kind, z, targets)
                self._output_ops.append(lambda u, dz=dz: empirical_fisher_cotangent(dz, u))
            else:
                self._output_ops.append(output_hessian(self.loss_kind, z))

    def _product(self, i: int, vector: Params) -> Params:
        # Forward-over-reverse has nothing to cache: it reruns everything per product.
        forward_over_reverse = (
            self.curvature == "hessian" and self.hvp_mode != "reverse_over_reverse"
        )
        if not self.cache or forward_over_reverse:
            return vector_product(
                self.curvature,
                self.model,
                self.params,
                self.batches[i],
                self.loss_kind,
                vector,
                hvp_mode=self.hvp_mode,
            )
        if self.curvature == "hessian":
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
        all_reduce_vectors([out], self.comm, bucket_mb=self.bucket_mb)
        return out

    def __call__(self, vector: Params) -> Params:
        """``C v`` on the global curvature batch, as a :data:`Params` dict."""
        return unflatten(self.matvec(flatten(vector)), self.params)

    # -- the quadratic model along a tangent (CurveBall) ----------------------------------------

    def model_gradient(self, tangent: Params, *, update_norm_statistics: bool = False) -> Params:
        """``G t + ∇L`` on the global batch: the gradient of the quadratic model at ``t``.

        GGN kinds only. Per micro-batch one forward carrying ``J t`` and one backward
        (:func:`~secondorder.optim.functional.fused_ggn_pass`), whose graph is freed at once:
        the memory of one micro-batch whatever ``cache`` says. Averaged over micro-batches, then
        over ranks in one bucketed all-reduce. Keeps the micro-batch losses in :attr:`losses` and
        the output-space terms for :meth:`local_plane_model`.

        Args:
            tangent: ``t``.
            update_norm_statistics: the forward is the step's training forward (batch-norm
                running statistics updated once per micro-batch), for a method with no other.

        Returns:
            ``G t + ∇L`` per parameter, in ``params`` order (new tensors, not views).
        """
        if self.curvature not in ("ggn", "fisher"):
            raise ValueError(f"model_gradient needs the GGN, not {self.curvature!r}")
        self._terms, self.losses, total = [], [], None
        for batch in self.batches:
            terms, grads = fused_ggn_pass(
                self.model,
                self.params,
                tangent,
                batch,
                self.loss_kind,
                update_norm_statistics=update_norm_statistics,
            )
            self._terms.append(terms)
            self.losses.append(terms.loss)
            total = grads if total is None else torch._foreach_add(total, grads)
        if len(self.batches) > 1:
            torch._foreach_div_(total, float(len(self.batches)))
        self.products += 1
        all_reduce_vectors(total, self.comm, bucket_mb=self.bucket_mb)
        return dict(zip(self.params, total, strict=True))

    def local_plane_model(self, vector: Params) -> Tensor:
        """``[tᵀGt, tᵀGv, vᵀGv, ∇Lᵀt, ∇Lᵀv]`` on this rank's batch, ``t`` the last tangent.

        The quadratic model on the plane of ``t`` (of :meth:`model_gradient`) and ``v``, from
        output-space products: ``uᵀGv = (J u)ᵀ H_L (J v)`` and ``∇Lᵀv = (∂L/∂z)ᵀ (J v)``, so
        ``v`` costs one forward-mode ``J v`` per micro-batch and no backward. Means over
        micro-batches (each ``H_L`` is its micro-batch's mean, so this is the union's); no
        collective: the caller reduces these with its other scalars in one.
        """
        if not self._terms:
            raise RuntimeError("local_plane_model needs model_gradient's terms; call it first")
        jv = [forward_jvp(self.model, self.params, vector, x) for x, _ in self.batches]
        hjv = [terms.output_hessian(u) for terms, u in zip(self._terms, jv, strict=True)]
        jt = [terms.jt for terms in self._terms]
        hjt = [terms.hjt for terms in self._terms]
        e = [terms.output_gradient for terms in self._terms]
        pairs = ((jt, hjt), (jt, hjv), (jv, hjv), (e, jt), (e, jv))
        return torch.stack([_mean_dot(a, b) for a, b in pairs])


def _mean_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Mean over micro-batches of output-space dot products."""
    return torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).mean()
