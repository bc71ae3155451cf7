"""The Hydra configs of ``python -m secondorder.train``, as the package ``secondorder.configs``.

Hydra imports this package when it composes ``pkg://secondorder.configs``; importing it stores
every optimizer's defaults, read from the class signature, as ``schema/optimizer/<name>``, which
the presets in ``optimizer/`` start from.
"""

from secondorder.config import register_optimizer_schemas

register_optimizer_schemas()
