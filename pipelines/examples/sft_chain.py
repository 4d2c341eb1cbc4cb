"""SFT on builtin:arith-chain — the recipe of `builtin:tiny-arith-chain`.

Trains a freshly initialised ~0.66M-parameter Llama (`builtin:tiny-arith-chain-init`) on
sums of three or four two-digit terms answered with written-out steps
(`12+34+56=` -> `12+34=46;46+56=102`); built and cached on first use of
`builtin:tiny-arith-chain`, like `pipelines/sft.py` for `builtin:tiny-arith`. It stops on
purpose at a moderate held-out accuracy (21.4 % after its 450 steps, about 2 minutes on
one CPU thread; 53.8 % after 500), so that RL has room to improve it.

    rlflow run pipelines/examples/sft_chain.py --threads 1
    rlflow run pipelines/examples/sft_chain.py --steps 1000 --set pipeline.eval='{"every": 100}'
"""

from rlflow import Demonstrations, Eval, Loss, Model, Pipeline
from rlflow.arith_chain import MAX_NEW_TOKENS, SFT_BATCH, SFT_LR, SFT_STEPS, SFT_WARMUP, exact_match

pipeline = Pipeline(
    name="sft_chain",
    description="supervised fine-tuning on written-out multi-term sums (builtin:arith-chain)",
    data=Demonstrations("builtin:arith-chain", batch_size=SFT_BATCH),
    models={"policy": Model("builtin:tiny-arith-chain-init", train=True, lr=SFT_LR, warmup_steps=SFT_WARMUP)},
    nodes=[Loss("nll", model="policy", agg="token-mean")],
    steps=SFT_STEPS,
    eval=Eval(max_new_tokens=MAX_NEW_TOKENS, size=500, rule=exact_match),
)
