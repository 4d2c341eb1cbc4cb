"""Reward model — a Bradley-Terry model on preference pairs (InstructGPT §3.5).

The tiny model's backbone with a scalar head (AutoModelForSequenceClassification, one
label) learns s(chosen) > s(rejected) with -log σ(s_w - s_l); it reports pairwise
accuracy on held-out pairs. The result in runs/<run>/final loads with
AutoModelForSequenceClassification and serves as Score(model=...) in ppo.py.

    rlflow run pipelines/reward_model.py
    rlflow run pipelines/reward_model.py --set rm.lr=3e-4 --steps 300
"""

from rlflow import Loss, Model, Pairs, Pipeline

pipeline = Pipeline(
    name="reward_model",
    description="Bradley-Terry reward model on preference pairs",
    data=Pairs("builtin:arith", batch_size=64),
    models={"rm": Model("builtin:tiny-arith", head="reward", train=True, lr=3e-4)},
    nodes=[Loss("bradley_terry", model="rm")],
    steps=300,
)
