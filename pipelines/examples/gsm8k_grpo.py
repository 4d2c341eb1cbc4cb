"""GSM8K-style maths with GRPO on a real instruct model (Qwen2.5-0.5B-Instruct): the toy's path to a real run.

What changes from pipelines/grpo.py: a Hugging Face model id, chat prompts rendered by its
chat template (the rows' "messages"), rule rewards from rlflow.rewards (the boxed answer
against the "#### N" of the reference, plus a small format bonus), longer responses, bf16.
The jsonl files beside this one hold GSM8K-style rows. Runs where the model is cached
(hf download Qwen/Qwen2.5-0.5B-Instruct); `rlflow validate` checks it anywhere.

    rlflow run gsm8k_grpo --set data.source=my_gsm8k.jsonl --set generate.n=16
    deepspeed --num_gpus 8 -m rlflow run pipelines/examples/gsm8k_grpo.py --out runs/gsm8k-8 --set actor.zero_stage=3
"""

from pathlib import Path

from rlflow import Advantage, Eval, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.rewards import boxed_format, math_exact

HERE = Path(__file__).parent
actor = Model("Qwen/Qwen2.5-0.5B-Instruct", train=True, lr=1e-6, precision="bf16", micro_batch_size=8)

pipeline = Pipeline(
    name="gsm8k_grpo",
    description="GRPO on GSM8K-style problems with an instruct model, chat prompts and math rules",
    data=Prompts(str(HERE / "gsm8k_train.jsonl"), messages_field="messages", batch_size=16,
                 eval_source=str(HERE / "gsm8k_test.jsonl")),
    models={"actor": actor, "ref": actor.frozen()},
    nodes=[
        Generate("actor", n=8, max_new_tokens=512, temperature=1.0),
        Score(rules={"correct": math_exact, "format": (boxed_format, 0.1)}),  # 1 per right answer, 0.1 for \boxed{}
        RefLogprob("ref"),
        Advantage("group_norm"),
        Loss("clip", model="actor", eps=0.2, kl_coef=0.001, kl="k3", agg="token-mean"),
    ],
    eval=Eval(every=20, size=500, max_new_tokens=512, rule=math_exact),
    steps=200,
)
