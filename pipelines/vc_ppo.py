"""VC-PPO — Value-Calibrated PPO (arXiv 2503.01491): value pretraining + decoupled GAE.

The critic first learns alone (the actor frozen, so samples come from the SFT policy)
on Monte-Carlo targets (λ_critic = 1); then PPO runs with λ_actor = 0.95 for the
advantages and λ_critic = 1 for the critic's returns. Reward ±1 (rule verifier), no KL.
ALGORITHMS.md §2.

    rlflow run pipelines/vc_ppo.py
    rlflow run pipelines/vc_ppo.py --set advantage.lam=0.99
"""

from rlflow import Advantage, Generate, Loss, Model, Phase, Pipeline, Prompts, Score, Value
from rlflow.arith import MAX_NEW_TOKENS, signed_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)

pipeline = Pipeline(
    name="vc_ppo",
    description="PPO with value pretraining and decoupled GAE (λ_actor=0.95, λ_critic=1)",
    data=Prompts("builtin:arith", batch_size=128),
    models={"actor": actor, "critic": actor.critic(lr=3e-4)},
    nodes=[
        Generate("actor", n=1, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        Score(rule=signed_match),
        Value("critic"),
        Advantage("gae", gamma=1.0, lam=0.95, lambda_critic=1.0, whiten=True),
        Loss("clip", model="actor", eps=0.2, agg="token-mean"),
        Loss("value", model="critic", eps_v=0.2, agg="token-mean", name="value_loss"),
    ],
    phases=[Phase(steps=20, train=["critic"])],  # value pretraining: 20 steps, then its explained variance is reported
    steps=220,
    ppo_epochs=2,
    mini_batches=2,
)
