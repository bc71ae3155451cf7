"""K-FAC (Martens & Grosse 2015) and synchronous distributed K-FAC (Ba, Grosse & Martens 2017).

- :mod:`.layers`: which layers are preconditioned and how their factor rows are read (KFC).
- :mod:`.capture`: factor statistics from hooks; the true-Fisher sampled backward.
- :mod:`.sampling`: targets sampled from the model's predictive distribution.
- :mod:`.inverse`: factored Tikhonov damping with π, robust float64 decompositions.
- :mod:`.precondition`: applying ``(A ⊗ G + λ)⁻¹`` (eigenbasis / inverses, doubly factored).
- :mod:`.assignment`: greedy LPT assignment of inversions (and layers) to ranks.
- :mod:`.distributed`: bucketed factor all-reduce, owner broadcasts.
- :mod:`.damping`: Levenberg–Marquardt adaptation of ``λ``.
- :mod:`.kronecker`: steps 1-4 (factors, decompositions) and all that curvature workers see.
- :mod:`.async_curvature` (:mod:`.async_inversion`, :mod:`.async_stats`): curvature workers
  (Ba, Grosse & Martens 2017, section 5) behind :mod:`.exchange`'s interfaces, configured by
  :mod:`.worker_settings`.
- :mod:`.optimizer`: the :class:`KFAC` optimizer.
"""

from secondorder.optim.kfac.optimizer import KFAC

__all__ = ["KFAC"]
