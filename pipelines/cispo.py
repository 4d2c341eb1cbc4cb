"""CISPO — Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585, §3.1).

GRPO's group-normalised advantages with a different loss: instead of zeroing the
gradient of a token whose ratio left the clip band (PPO), CISPO clips the importance
weight itself and detaches it, so every token keeps a REINFORCE gradient weighted by
sg(min(ρ, 1+ε_high)) (no lower bound). Token-mean over the batch, no KL, no reference
model. The batch is split into 2 mini-batches so that the ratio leaves 1 and the weight
clip acts (with 4, as gspo.py, it overshoots here: docs/algorithms.md).

    rlflow run pipelines/cispo.py
    rlflow run pipelines/cispo.py --set loss.eps_high=0.28 --set pipeline.mini_batches=4
"""

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import MAX_NEW_TOKENS, exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="cispo",
    description="group-normalised advantages, clipped detached IS weight on every token, token-mean",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=exact_match),
        Advantage("group_norm", eps=1e-6),
        Loss("cispo", model="actor", eps_low=None, eps_high=0.2, agg="token-mean"),
    ],
    steps=300,
    mini_batches=2,  # a second, off-policy update per batch: there CISPO's tokens keep a (bounded) gradient
)
