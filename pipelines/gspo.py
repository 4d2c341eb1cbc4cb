"""GSPO — Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071).

GRPO with one importance ratio per SEQUENCE instead of per token: s_i, the geometric mean
of the token ratios, is clipped to the tiny band [1-3e-4, 1+4e-4] (the paper's), so a
sequence that drifted is clipped whole. Everything else is grpo.py: group-normalised
advantages, k3 KL in the loss (kept so that the two files differ only in the loss node
and the schedule; the paper has none: --set loss.kl_coef=0), seq-mean-token-mean. The
batch is split into 4 mini-batches, as in the paper, so that the ratio leaves 1 and the
clip acts (with one update per batch GSPO's gradient is GRPO's). docs/algorithms.md.

    rlflow run pipelines/gspo.py
    rlflow run pipelines/gspo.py --set loss.kl_coef=0 --set loss.eps_high=1e-3
    rlflow compare pipelines/grpo.py pipelines/gspo.py
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="gspo",
    description="grpo with a clipped sequence-level ratio (GSPO-token), 4 mini-batches",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor, "ref": actor.frozen()},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        RefLogprob("ref"),
        Advantage("group_norm", eps=1e-6),
        Loss("gspo", model="actor", eps_low=3e-4, eps_high=4e-4, kl_coef=0.04, kl="k3", agg="seq-mean-token-mean"),
    ],
    steps=300,
    mini_batches=4,  # the paper: each rollout batch is split into 4 mini-batches
)
