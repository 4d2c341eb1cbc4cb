"""DAPO — Decoupled clip and Dynamic sAmpling Policy Optimization (arXiv 2503.14476).

GRPO's group-normalised advantages with four changes: clip-higher (ε_low 0.2, ε_high
0.28), dynamic sampling (groups whose answers are all right or all wrong are dropped and
fresh prompts are drawn until the batch is full), token-mean aggregation, and a soft
overlong punishment in the reward. Reward ±1, no KL, no reference model; dual-clip
c = 10 and several mini-batches per step (so the clip acts) as in verl's DAPO recipe.
ALGORITHMS.md §7.

    rlflow run pipelines/dapo.py
    rlflow run pipelines/dapo.py --set filter.max_rounds=20 --set loss.eps_high=0.3
"""

from rlflow import Advantage, Filter, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import signed_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="dapo",
    description="clip-higher, dynamic sampling, token-mean, soft overlong punishment",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor},
    nodes=[
        # answers are at most 4 tokens; the last 2 of 6 are the overlong buffer (L_cache)
        Generate("actor", n=8, max_new_tokens=6, temperature=1.0),
        Score(rule=signed_match, overlong_buffer=2, overlong_penalty=1.0),
        Filter("dynamic", metric="rewards_signed_match", max_rounds=10),  # on accuracy, as verl (not the shaped reward)
        Advantage("group_norm"),
        Loss("clip_higher", model="actor", eps_low=0.2, eps_high=0.28, dual_clip=10.0, agg="token-mean"),
    ],
    steps=300,
    mini_batches=4,  # the paper: 16 updates per step (mini-batch 512 of 8192 responses)
)
