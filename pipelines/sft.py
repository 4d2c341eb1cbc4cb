"""SFT — supervised fine-tuning on demonstrations (next-token NLL on the completion).

Trains a freshly initialised ~0.66M-parameter Llama (`builtin:tiny-arith-init`) on
two-digit addition; this is the recipe that builds `builtin:tiny-arith` on first use.
It stops on purpose at a moderate held-out accuracy (about 20-40 %), so that the RL
pipelines have room to improve it.

    rlflow run pipelines/sft.py                      # CPU, about a minute
    rlflow run pipelines/sft.py --set policy.lr=3e-4 --steps 1000
"""

from rlflow import Demonstrations, Eval, Loss, Model, Pipeline
from rlflow.arith import MAX_NEW_TOKENS, SFT_BATCH, SFT_LR, SFT_STEPS, SFT_WARMUP, exact_match

pipeline = Pipeline(
    name="sft",
    description="supervised fine-tuning: next-token NLL on demonstrations",
    data=Demonstrations("builtin:arith", batch_size=SFT_BATCH),
    models={"policy": Model("builtin:tiny-arith-init", train=True, lr=SFT_LR, warmup_steps=SFT_WARMUP)},
    nodes=[Loss("nll", model="policy", agg="token-mean")],
    steps=SFT_STEPS,
    eval=Eval(max_new_tokens=MAX_NEW_TOKENS, size=500, rule=exact_match),
)
