"""The node library (installed as ``rlflow.nodes``): one module per node kind.

Importing it registers every shipped node runner and every Advantage, Loss and Filter
variant. The modules take torch lazily (:mod:`rlflow.lazy`), so importing the library
for validation imports no torch.
"""

from rlflow.nodes import advantage, filter, generate, loss, ref_logprob, score, value  # noqa: F401
