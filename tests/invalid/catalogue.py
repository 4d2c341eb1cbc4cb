"""The catalogue of invalid input: malformed pipelines, data files, configs and command lines.

Each case is the files it writes into a fresh directory (name -> text), the command line
run there, and what must come back: the exit code, the error code, and a phrase of the
message. ``tests/test_invalid.py`` runs every case through ``rlflow.cli.main`` in-process.

Most pipelines are :func:`grpo` with one thing changed, so that each case differs from a
valid pipeline (``test_the_template_is_valid``) by exactly its fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from rlflow import Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import exact_match


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    code: str
    phrase: str  # a part of the message (case-sensitive)
    files: dict[str, str] = field(default_factory=dict)
    exit: int = 2
    not_root: bool = False  # a permission case: root may write anywhere


HEAD = "from typing import ClassVar\nfrom rlflow import *\nfrom rlflow.arith import exact_match\nfrom rlflow.spec import Node\n"


def grpo(*, actor: str = 'Model("builtin:tiny-arith", train=True, lr=1e-4)', data: str = 'Prompts("builtin:arith", batch_size=4)',
         models: str = '{"actor": actor, "ref": actor.frozen()}', gen: str = '"actor", n=4', score: str = "rule=exact_match",
         ref: str = '"ref"', adv: str = '"group_norm"', loss: str = '"clip", kl_coef=0.04', nodes: str = "",
         extra: str = "", before: str = "") -> str:
    """The source of a valid GRPO pipeline file, with the given pieces replaced."""
    nodes = nodes or f"Generate({gen}), Score({score}), RefLogprob({ref}), Advantage({adv}), Loss({loss})"
    return (f"{HEAD}{before}\nactor = {actor}\n"
            f"pipeline = Pipeline(name=\"case\", data={data}, models={models},\n    nodes=[{nodes}]{extra})\n")


def sft(*, loss: str = '"nll"', data: str = 'Demonstrations("builtin:arith", batch_size=4)') -> str:
    """The source of a valid SFT pipeline file (no Generate node)."""
    return (f"{HEAD}pipeline = Pipeline(name=\"sft\", data={data},\n"
            f"    models={{\"actor\": Model(\"builtin:tiny-arith-init\", train=True)}}, nodes=[Loss({loss})])\n")


def config(mutate) -> str:
    """A run's config.json (of the valid GRPO pipeline), changed by ``mutate(dict)``."""
    actor = Model("builtin:tiny-arith", train=True)
    p = Pipeline(name="case", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor},
                 nodes=[Generate("actor", n=4), Score(rule=exact_match), Loss("nll")])
    data = p.to_config()
    mutate(data)
    return json.dumps(data)


def _set(path: str, value):
    """A mutation of config data: ``nodes.1.kind`` = value."""
    def mutate(data):
        *head, last = path.split(".")
        for k in head:
            data = data[int(k)] if k.isdigit() else data[k]
        data[int(last) if last.isdigit() else last] = value
    return mutate


TWO_NODE_KINDS = """
class Critique(Node):
    kind: ClassVar[str] = "critique"
    def reads(self): return {"rewards": "seq", "revision": "text"}
    def writes(self): return {"critique": "text"}

class Revise(Node):
    kind: ClassVar[str] = "revise"
    def reads(self): return {"critique": "text"}
    def writes(self): return {"revision": "text", "advantages": "token"}
"""

TOKEN_REWARD = """
class TokenReward(Node):
    kind: ClassVar[str] = "token_reward"
    def reads(self): return {"response_ids": "token"}
    def writes(self): return {"rewards": "token"}
"""

V, P = ["validate", "p.py"], "p.py"
OK = {"p.py": grpo()}
METRIC = json.dumps({"step": 1, "nodes": {"generate": {"seconds": 0.1, "rows": 4}}, "reward/mean": 0.5})

CASES = [
    # --- the file: found, parsed, one pipeline --------------------------------------------------
    Case("missing_file", ["validate", "nosuch.py"], "RF100", "nosuch.py: no such pipeline file"),
    Case("not_a_py_file", ["validate", "p.txt"], "RF100", "a pipeline is a .py file", {"p.txt": grpo()}),
    Case("directory", ["validate", "d.py"], "RF100", "a pipeline is a .py file", {"d.py/x": ""}),
    Case("syntax_error", V, "RF101", "p.py:2: syntax error", {P: "from rlflow import Pipeline\npipeline = Pipeline(name=\n"}),
    Case("no_pipeline", V, "RF102", "defines no `pipeline = Pipeline(...)`", {P: "x = 1\n"}),
    Case("pipeline_not_a_pipeline", V, "RF102", "defines no `pipeline", {P: "pipeline = {'name': 'grpo'}\n"}),
    Case("two_pipelines", V, "RF102", "(it has 2 Pipeline objects)",
         {P: grpo().replace("pipeline = ", "a = ") + grpo().replace("pipeline = ", "b = ")}),
    Case("import_error", V, "RF105", "cannot import: No module named 'no_such_module'", {P: "import no_such_module\n" + grpo()}),
    Case("misspelt_import", V, "RF105", "cannot import name 'Generat'", {P: "from rlflow import Generat\n"}),
    Case("system_exit", V, "RF105", "p.py:2: the pipeline file called sys.exit(3)", {P: "import sys\nsys.exit(3)\n"}),
    Case("raises", V, "RF105", "RuntimeError while loading the pipeline: boom", {P: "raise RuntimeError('boom')\n"}),
    # --- a spec: kinds, variants, parameters, types, bounds ----------------------------------
    Case("unknown_advantage_variant", V, "RF104", "unknown advantage variant: 'group_norn'", {P: grpo(adv='"group_norn"')}),
    Case("did_you_mean_variant", V, "RF104", "Did you mean 'group_norm'?", {P: grpo(adv='"group_norn"')}),
    Case("unknown_loss_variant", V, "RF104", "Did you mean 'clip'?", {P: grpo(loss='"clipp"')}),
    Case("misspelt_parameter", V, "RF103", "Loss[clip].epsilon: Extra inputs are not permitted", {P: grpo(loss='"clip", epsilon=0.2')}),
    Case("misspelt_generate_parameter", V, "RF103", "Generate.temprature: Extra inputs", {P: grpo(gen='"actor", temprature=0.7')}),
    Case("wrong_type", V, "RF103", "Generate.n: Input should be a valid integer", {P: grpo(gen='"actor", n="four"')}),
    Case("score_without_rule", V, "RF103", "Score needs a rule", {P: grpo(score="")}),
    Case("reserved_rule_name", V, "RF103", "rule name 'mean' is reserved", {P: grpo(score='rules={"mean": exact_match}')}),
    Case("eps_zero", V, "RF103", "Loss[clip].eps: Input should be greater than 0", {P: grpo(loss='"clip", eps=0')}),
    Case("eps_negative", V, "RF103", "Loss[clip].eps: Input should be greater than 0", {P: grpo(loss='"clip", eps=-0.2')}),
    Case("lam_above_one", V, "RF103", "Advantage[gae].lam: Input should be less than or equal to 1", {P: grpo(adv='"gae", lam=1.5')}),
    Case("lr_zero", V, "RF103", "Model.lr: Input should be greater than 0",
         {P: grpo(actor='Model("builtin:tiny-arith", train=True, lr=0)')}),
    Case("beta_one", V, "RF103", "Model.betas.1: Input should be less than 1",
         {P: grpo(actor='Model("builtin:tiny-arith", train=True, betas=(0.9, 1.0))')}),
    Case("weight_decay_negative", V, "RF103", "Model.weight_decay: Input should be greater than or equal to 0",
         {P: grpo(actor='Model("builtin:tiny-arith", train=True, weight_decay=-0.1)')}),
    Case("grad_clip_zero", V, "RF103", "Model.grad_clip: Input should be greater than 0",
         {P: grpo(actor='Model("builtin:tiny-arith", train=True, grad_clip=0)')}),
    Case("warmup_negative", V, "RF103", "Model.warmup_steps: Input should be greater than or equal to 0",
         {P: grpo(actor='Model("builtin:tiny-arith", train=True, warmup_steps=-1)')}),
    Case("n_zero", V, "RF103", "Generate.n: Input should be greater than or equal to 1", {P: grpo(gen='"actor", n=0')}),
    Case("temperature_zero", V, "RF103", "Generate.temperature: Input should be greater than 0", {P: grpo(gen='"actor", temperature=0')}),
    Case("top_p_above_one", V, "RF103", "Generate.top_p: Input should be less than or equal to 1", {P: grpo(gen='"actor", top_p=1.5')}),
    Case("batch_size_zero", V, "RF103", "Prompts.batch_size: Input should be greater than or equal to 1",
         {P: grpo(data='Prompts("builtin:arith", batch_size=0)')}),
    Case("eval_size_zero", V, "RF103", "Eval.size: Input should be greater than or equal to 1", {P: grpo(extra=", eval=Eval(size=0)")}),
    Case("seed_too_big", V, "RF103", "Pipeline.seed: Input should be less than 4294967296", {P: grpo(extra=", seed=2**32")}),
    Case("steps_zero_in_file", V, "RF103", "Pipeline.steps: Input should be greater than or equal to 1", {P: grpo(extra=", steps=0")}),
    Case("nan_in_file", V, "RF103", "Loss[clip].eps: Input should be a finite number", {P: grpo(loss='"clip", eps=float("nan")')}),
    Case("inf_in_file", V, "RF103", "Generate.temperature: Input should be a finite number",
         {P: grpo(gen='"actor", temperature=float("inf")')}),
    # --- the graph -----------------------------------------------------------------------------
    Case("empty_pipeline", V, "RF013", "the pipeline has no nodes", {P: grpo(nodes=" ", models='{"actor": actor.frozen()}')}),
    Case("kind_without_runner", V, "RF014", "node kind 'critique' has no runner",
         {P: grpo(before=TWO_NODE_KINDS, nodes='Generate("actor", n=4), Score(rule=exact_match), Critique(), Loss("nll")')}),
    Case("duplicate_names", V, "RF001", "node 'score', field 'name': two nodes have this name",
         {P: grpo(score="rule=exact_match), Score(rule=exact_match")}),
    Case("cycle", V, "RF002", "cycle: critique -> revise -> critique",
         {P: grpo(before=TWO_NODE_KINDS, nodes='Generate("actor", n=4), Score(rule=exact_match), Critique(), Revise(), Loss("clip")')}),
    Case("read_never_written", V, "RF003", "reads column 'rewards' that no node writes",
         {P: grpo(nodes='Generate("actor", n=4), RefLogprob("ref"), Advantage("group_norm"), Loss("clip", kl_coef=0.04)')}),
    Case("double_writer", V, "RF004", "column 'rewards' is written by score, score2",
         {P: grpo(score='rule=exact_match), Score(rule=exact_match, name="score2"')}),
    Case("undeclared_model", V, "RF005", "uses model 'reff', which the pipeline does not declare", {P: grpo(ref='"reff"')}),
    Case("undeclared_model_did_you_mean", V, "RF005", "did you mean 'ref'?", {P: grpo(ref='"reff"')}),
    Case("trainable_without_loss", V, "RF006", "model 'other' is trainable but no Loss node trains it",
         {P: grpo(models='{"actor": actor, "ref": actor.frozen(), "other": actor}')}),
    Case("loss_on_frozen", V, "RF007", "Loss on model 'ref', which is frozen", {P: grpo(loss='"clip", model="ref"')}),
    Case("level_mismatch", V, "RF008", "reads 'rewards' at level 'seq' but 'token_reward' writes it at level 'token'",
         {P: grpo(before=TOKEN_REWARD, nodes='Generate("actor", n=4), TokenReward(), Advantage("group_norm"), Loss("clip")')}),
    Case("group_advantage_n1", V, "RF009", "needs several samples per prompt, but 'generate' samples n=1", {P: grpo(gen='"actor", n=1')}),
    Case("head_mismatch", V, "RF011", "Value needs a critic", {P: grpo(ref='"ref"), Value("actor"')}),
    Case("overlong_buffer_too_long", V, "RF012", "the overlong buffer must be shorter than max_new_tokens",
         {P: grpo(gen='"actor", n=4, max_new_tokens=8', score="rule=exact_match, overlong_buffer=8")}),
    Case("sum_norm_without_generate", V, "RF012", "seq-mean-token-sum-norm takes C from Generate.max_new_tokens",
         {P: sft(loss='"nll", agg="seq-mean-token-sum-norm"')}),
    Case("offload_without_zero", V, "RF015", "offload moves the optimizer state to the CPU, which needs ZeRO stage >= 1",
         {P: grpo(actor='Model("builtin:tiny-arith", train=True, offload=True)')}),
    Case("offload_params_without_zero3", V, "RF015", "offload_params keeps the parameters' shards on the CPU, which needs ZeRO stage 3",
         {P: grpo(actor='Model("builtin:tiny-arith", train=True, zero_stage=2, offload_params=True)')}),
    Case("more_mini_batches_than_groups", V, "RF015", "8 mini-batches of whole groups, but a batch has 4 groups",
         {P: grpo(extra=", mini_batches=8")}),
    Case("phase_trains_frozen_model", V, "RF015", "phase trains model 'ref', which is frozen",
         {P: grpo(extra=', phases=[Phase(steps=2, train=["ref"])]')}),
    Case("eval_source_on_builtin_data", V, "RF015", "builtin:arith has its own held-out split",
         {P: grpo(data='Prompts("builtin:arith", batch_size=4, eval_source="d.jsonl")')}),
    Case("eval_pairs_on_pair_data", V, "RF015", "the data are Pairs, so evaluation uses their own held-out split",
         {P: sft(data='Pairs("builtin:arith", batch_size=4)').replace("nodes=[", "eval=Eval(pairs='builtin:arith'), nodes=[")}),
    Case("lora_on_a_frozen_model_that_is_no_base", V, "RF015", "a frozen model would get a fresh LoRA adapter",
         {P: grpo(models='{"actor": actor, "ref": Model("builtin:tiny-arith-init", lora=LoRA())}')}),
    Case("lora_on_a_critic", V, "RF103", "lora is for language models (head='lm'), not head='value'",
         {P: grpo(actor='Model("builtin:tiny-arith", train=True, head="value", lora=LoRA())')}),
    Case("lora_rank_zero", V, "RF103", "LoRA.r: Input should be greater than or equal to 1",
         {P: grpo(actor='Model("builtin:tiny-arith", train=True, lora=LoRA(r=0))')}),
    # --- models and data -----------------------------------------------------------------------
    Case("missing_model_path", V, "RF107", "model path './no/such/model' does not exist",
         {P: grpo(actor='Model("./no/such/model", train=True)')}),
    Case("model_path_is_a_file", V, "RF107", "model path 'p.py' is a file", {P: grpo(actor='Model("p.py", train=True)')}),
    Case("model_dir_without_config", V, "RF107", "'m' is a directory without a config.json",
         {P: grpo(actor='Model("m", train=True)'), "m/weights.bin": ""}),
    Case("unknown_builtin_model", V, "RF107", "unknown built-in model: 'builtin:tiny'", {P: grpo(actor='Model("builtin:tiny", train=True)')}),
    Case("missing_data_file", V, "RF108", "data file 'no.jsonl' does not exist", {P: grpo(data='Prompts("no.jsonl", batch_size=4)')}),
    Case("unknown_builtin_data", V, "RF108", "unknown built-in data source: 'builtin:arithmetic'",
         {P: grpo(data='Prompts("builtin:arithmetic", batch_size=4)')}),
    Case("missing_eval_source", V, "RF108", "field 'eval_source': data file 'held.jsonl' does not exist",
         {P: grpo(data='Prompts("d.jsonl", batch_size=4, eval_source="held.jsonl")'), "d.jsonl": '{"prompt": "1+1=", "answer": "2"}\n'}),
    Case("data_bad_json_line", V, "RF114", "d.jsonl:2: not valid JSON",
         {P: grpo(data='Prompts("d.jsonl", batch_size=4)'), "d.jsonl": '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", \n'}),
    Case("data_missing_field", V, "RF114", "d.jsonl:2: the row has no field 'prompt' (it has 'answer', 'question'); prompt_field=",
         {P: grpo(data='Prompts("d.jsonl", batch_size=4)'),
          "d.jsonl": '{"prompt": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4"}\n'}),
    Case("data_field_not_text", V, "RF114", "d.jsonl:1: field 'prompt' is not text (a JSON number)",
         {P: grpo(data='Prompts("d.jsonl", batch_size=4)'), "d.jsonl": '{"prompt": 3, "answer": "2"}\n'}),
    Case("data_row_not_an_object", V, "RF114", "d.jsonl:1: a row is a JSON object, found a JSON array",
         {P: grpo(data='Prompts("d.jsonl", batch_size=4)'), "d.jsonl": '["1+1=", "2"]\n'}),
    Case("data_empty", V, "RF114", "d.jsonl: no rows", {P: grpo(data='Prompts("d.jsonl", batch_size=4)'), "d.jsonl": "\n"}),
    Case("pairs_missing_rejected", V, "RF114", "the row has no field 'rejected'",
         {P: sft(loss='"nll"', data='Pairs("d.jsonl", batch_size=4)'), "d.jsonl": '{"prompt": "1+1=", "chosen": "2"}\n'}),
    Case("eval_pairs_missing_chosen", V, "RF114", "field 'pairs': e.jsonl:1: the row has no field 'chosen'",
         {P: grpo(extra=', eval=Eval(pairs="e.jsonl")'), "e.jsonl": '{"prompt": "1+1=", "better": "2", "rejected": "3"}\n'}),
    Case("run_bad_data_before_models_load", ["run", P], "RF114", "d.jsonl:1: not valid JSON",
         {P: grpo(data='Prompts("d.jsonl", batch_size=4)'), "d.jsonl": "{oops\n"}),
    Case("run_missing_model_before_it_loads", ["run", P], "RF107", "model path './no/model' does not exist",
         {P: grpo(actor='Model("./no/model", train=True)')}),
    Case("run_graph_problem", ["run", P], "RF009", "invalid pipeline", {P: grpo(gen='"actor", n=1')}),
    # --- --set ---------------------------------------------------------------------------------
    Case("set_syntax", ["run", P, "--set", "generate.n"], "RF106", "expected NAME.PARAM=VALUE", OK),
    Case("set_no_param", ["run", P, "--set", "generate=4"], "RF106", "expected NAME.PARAM=VALUE", OK),
    Case("set_unknown_node", ["run", P, "--set", "generat.n=4"], "RF106", "unknown node: 'generat'", OK),
    Case("set_unknown_node_did_you_mean", ["run", P, "--set", "generat.n=4"], "RF106", "Did you mean 'generate'?", OK),
    Case("set_unknown_param", ["run", P, "--set", "generate.nn=4"], "RF106", "unknown parameter of node 'generate': 'nn'", OK),
    Case("set_unknown_model_param", ["run", P, "--set", "actor.lrr=1e-4"], "RF106", "Did you mean 'lr'?", OK),
    Case("set_nested_param_of_a_plain_field", ["run", P, "--set", "actor.lr.x=1"], "RF106",
         "unknown parameter of model 'actor': 'lr.x'", OK),
    Case("set_unknown_lora_param", ["run", P, "--set", "actor.lora.rank=8"], "RF103", "Model.lora.rank: Extra inputs", OK),
    Case("set_unknown_pipeline_param", ["run", P, "--set", "pipeline.stepz=3"], "RF106", "Did you mean 'steps'?", OK),
    Case("set_wrong_type", ["run", P, "--set", "generate.n=zero"], "RF103", "--set 'generate.n=zero': invalid Generate.n", OK),
    Case("set_nan", ["run", P, "--set", "loss.eps=NaN"], "RF103", "Loss[clip].eps: Input should be a finite number (got nan)", OK),
    Case("set_inf", ["run", P, "--set", "generate.temperature=Infinity"], "RF103", "Input should be a finite number (got inf)", OK),
    Case("set_out_of_range", ["validate", P, "--set", "loss.eps=0"], "RF103", "Input should be greater than 0", OK),
    Case("set_breaks_the_graph", ["validate", P, "--set", "generate.n=1"], "RF009", "samples n=1", OK),
    Case("set_rule_not_importable", ["run", P, "--set", "score.rule=no_such_module:fn"], "RF115",
         "the rule 'no_such_module:fn' cannot be imported", OK),
    # --- flags ---------------------------------------------------------------------------------
    Case("steps_zero", ["run", P, "--steps", "0"], "RF111", "--steps 0: input should be greater than or equal to 1", OK),
    Case("steps_negative", ["run", P, "--steps", "-3"], "RF111", "--steps -3:", OK),
    Case("steps_not_a_number", ["run", P, "--steps", "ten"], "RF111", "argument --steps: invalid int value: 'ten'", OK),
    Case("seed_huge", ["run", P, "--seed", str(2**32)], "RF111", "--seed 4294967296: input should be less than 4294967296", OK),
    Case("seed_negative", ["run", P, "--seed", "-1"], "RF111", "--seed -1: input should be greater than or equal to 0", OK),
    Case("threads_negative", ["run", P, "--threads", "-1"], "RF111", "--threads -1: must be at least 1", OK),
    Case("threads_zero", ["run", P, "--threads", "0"], "RF111", "--threads 0: must be at least 1", OK),
    Case("nproc_zero", ["run", P, "--nproc", "0"], "RF111", "--nproc 0: must be at least 1", OK),
    Case("nproc_above_batch_size", ["run", P, "--nproc", "8"], "RF111",
         "--nproc 8: more processes than data.batch_size (4)", OK),
    Case("unknown_flag", ["run", P, "--stepz", "3"], "RF111", "unrecognized arguments: --stepz 3", OK),
    Case("no_command", [], "RF111", "the following arguments are required: command"),
    Case("unknown_command", ["trian", P], "RF111", "invalid choice: 'trian'", OK),
    # --- run directories -----------------------------------------------------------------------
    Case("out_is_a_file", ["run", P, "--out", "f"], "RF112", "--out f: is a file, not a directory", {**OK, "f": "x"}),
    Case("out_under_a_file", ["run", P, "--out", "f/run"], "RF112", "--out f/run: cannot write there", {**OK, "f": "x"}),
    Case("out_holds_a_run", ["run", P, "--out", "r"], "RF112", "--out r: already holds a run (config.json, metrics.jsonl); continue it with --resume r",
         {**OK, "r/metrics.jsonl": METRIC + "\n"}),
    Case("out_not_writable", ["run", P, "--out", "ro/run"], "RF112", "--out ro/run: cannot write there", {**OK, "ro/.keep": ""},
         not_root=True),
    Case("resume_without_checkpoints", ["run", P, "--resume", "r"], "RF109", "--resume r: no checkpoints/ there",
         {**OK, "r/metrics.jsonl": METRIC + "\n"}),
    Case("resume_and_another_out", ["run", P, "--resume", "r", "--out", "s"], "RF111", "a resumed run continues in its own directory",
         {**OK, "r/checkpoints/.keep": ""}),
    # --- report --------------------------------------------------------------------------------
    Case("report_not_a_run", ["report", "."], "RF109", "not a run directory (no metrics.jsonl)"),
    Case("report_no_such_dir", ["report", "nowhere"], "RF109", "nowhere: no such directory"),
    Case("report_truncated_metrics", ["report", "r"], "RF113", "metrics.jsonl:2: not valid JSON",
         {"r/metrics.jsonl": METRIC + "\n" + METRIC[:20]}),
    Case("report_shows_what_it_can", ["report", "r"], "RF113", "what could be read is shown above",
         {"r/metrics.jsonl": METRIC + "\n" + METRIC[:20]}),
    Case("report_line_not_a_record", ["report", "r"], "RF113", "metrics.jsonl:1: not a record", {"r/metrics.jsonl": "[1, 2]\n"}),
    Case("report_bad_summary", ["report", "r"], "RF113", "summary.json: not valid JSON",
         {"r/metrics.jsonl": METRIC + "\n", "r/summary.json": "{"}),
    Case("report_negative_samples", ["report", "r", "--samples", "-1"], "RF111", "--samples -1: must be 0 or more",
         {"r/metrics.jsonl": METRIC + "\n"}),
    # --- a run's config.json -------------------------------------------------------------------
    Case("config_not_json", ["validate", "config.json"], "RF100", "config.json: not a readable JSON config", {"config.json": "{oops"}),
    Case("config_not_an_object", ["validate", "config.json"], "RF100", "a config is a JSON object, found list", {"config.json": "[]"}),
    Case("config_rule_not_importable", ["validate", "config.json"], "RF115", "the rule 'no_such_module:exact_match' cannot be imported",
         {"config.json": config(_set("nodes.1.rules.exact_match.fn", "no_such_module:exact_match"))}),
    Case("config_rule_file_missing", ["validate", "config.json"], "RF115", "names the file 'gone.py', which does not exist",
         {"config.json": config(_set("nodes.1.rules.exact_match.fn", "gone.py:rule"))}),
    Case("config_rule_not_in_module", ["validate", "config.json"], "RF115", "rlflow.arith has no 'exact_mach'",
         {"config.json": config(_set("nodes.1.rules.exact_match.fn", "rlflow.arith:exact_mach"))}),
    Case("config_unknown_kind", ["validate", "config.json"], "RF104", "unknown node kind: 'generat'",
         {"config.json": config(_set("nodes.0.kind", "generat"))}),
    Case("config_unknown_field", ["validate", "config.json"], "RF103", "Extra inputs are not permitted",
         {"config.json": config(_set("nodes.0.nn", 4))}),
    # --- the other commands --------------------------------------------------------------------
    Case("graph_syntax_error", ["graph", P], "RF101", "syntax error", {P: "pipeline = (\n"}),
    Case("compare_missing_file", ["compare", P, "nosuch.py"], "RF100", "nosuch.py: no such pipeline file", OK),
]
