"""VAPO — Value-model-based Augmented PPO (arXiv 2504.05118).

PPO with a pretrained critic (value pretraining, Monte-Carlo targets), decoupled GAE
(λ_critic = 1) with a length-adaptive λ_actor = 1 - 1/(α·l), clip-higher, token-mean,
and a positive-example LM loss (NLL on correct samples, weight μ = 0.1). Reward ±1,
no KL. ALGORITHMS.md §8.

Scaled to the built-in task: responses here are 3-4 tokens, not thousands, so the
paper's α = 0.05 would clamp λ_actor to 0 for every response; α = 1.0 gives
λ_actor = 0.75 for a 4-token answer (the paper's α·l ≈ 5 at l = 100).

    rlflow run pipelines/vapo.py
    rlflow run pipelines/vapo.py --set advantage.length_alpha=0.5 --set ntp.coef=0
"""

from rlflow import Advantage, Generate, Loss, Model, Phase, Pipeline, Prompts, Score, Value
from rlflow.arith import MAX_NEW_TOKENS, signed_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="vapo",
    description="pretrained critic, length-adaptive decoupled GAE, clip-higher, NLL on correct samples",
    data=Prompts("builtin:arith", batch_size=32),
    models={"actor": actor, "critic": actor.critic(lr=3e-4)},
    nodes=[
        Generate("actor", n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=signed_match),
        Value("critic"),
        Advantage("gae", gamma=1.0, lambda_critic=1.0, length_alpha=1.0, whiten=True),
        Loss("clip_higher", model="actor", eps_low=0.2, eps_high=0.28, agg="token-mean"),
        Loss("nll", model="actor", where="correct", coef=0.1, agg="token-mean", name="ntp"),
        Loss("value", model="critic", eps_v=0.2, agg="token-mean", name="value_loss"),
    ],
    phases=[Phase(steps=20, train=["critic"])],  # value pretraining (paper: ~50 steps); reports explained variance
    steps=220,
    mini_batches=4,  # the paper: mini-batch 512 of 8192 responses
)
