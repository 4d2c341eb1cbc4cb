"""What the terminal shows, rendered as colourless text at a fixed width."""

from pathlib import Path

import pytest
from rich.console import Console

from rlflow.charts import line_chart, num, plural, sparkline, Series
from rlflow.graph import build, resolve
from rlflow.loader import load_pipeline
from rlflow.view import (Fanout, LiveView, StepLine, flow_line, render_graph, summary_lines, summary_table,
                         timing_table)

PIPES = Path(__file__).parent.parent / "pipelines"
RECORD = {
    "step": 7, "seconds": 0.5, "reward/mean": 0.625, "loss/pg": -0.01,
    "nodes": {"generate": {"seconds": 0.2, "rows": 256, "tokens": 900, "tokens_per_s": 4500.0},
              "loss": {"seconds": 0.3, "rows": 256, "tokens": 900, "tokens_per_s": 3000.0}},
}


def render(renderable, width=80):
    c = Console(width=width, record=True, color_system=None, force_terminal=False)
    c.print(renderable)
    return c.export_text()


def pipeline(name):
    return resolve(load_pipeline(PIPES / f"{name}.py"))


def test_timing_table_is_sorted_by_time_with_share_throughput_and_mfu():
    text = render(timing_table(RECORD["nodes"], mfu={"loss": 0.123}), width=100)
    rows = [line for line in text.splitlines() if "generate" in line or "│ loss" in line]
    assert "loss" in rows[0] and "generate" in rows[1]  # the slowest first
    assert "0.200" in rows[1] and "40.0%" in rows[1] and "256" in rows[1] and "4500" in rows[1]
    assert "60.0%" in rows[0] and "12.3%" in rows[0]  # MFU where the record has it
    assert rows[1].rstrip(" │").endswith("-")  # and "-" where it has not


def test_numbers_never_print_minus_zero():
    assert num(-0.0) == "0" and num(-1e-9, 4) == "-1e-09" and num(-0.00001, 2) == "-1e-05"
    assert num(float("nan")) == "-" and num(None) == "-"
    assert StepLine().render({**RECORD, "loss/pg": -0.0}).count("pg=0 ") == 1


def test_plurals():
    assert plural(1, "model") == "1 model" and plural(2, "model") == "2 models" and plural(0, "step") == "0 steps"
    assert plural(1, "mini-batch", "mini-batches") == "1 mini-batch" and plural(4, "mini-batch", "mini-batches") == "4 mini-batches"


def test_grpo_step_line_shows_the_kl_in_the_loss_and_no_clip_fraction():
    line = StepLine.of(pipeline("grpo"))
    text = line.render({**RECORD, "kl/mean": 0.0123, "clip_frac": 0.0, "entropy/mean": 1.5})
    assert text.startswith("step 7/300  reward=0.625  kl(k3)=0.0123  pg=-0.01  entropy=1.5")
    assert "clip" not in text  # one epoch of one mini-batch: the ratio is 1, the clip fraction cannot move


def test_dapo_step_line_shows_keep_fraction_refill_rounds_and_no_kl():
    line = StepLine.of(pipeline("dapo"))
    text = line.render({**RECORD, "filter/keep_frac": 0.5, "filter/rounds": 3.0, "clip_frac": 0.02})
    assert "keep=0.5" in text and "rounds=3" in text and "clip=0.02" in text  # four mini-batches: the clip acts
    assert "kl" not in text


def test_ppo_step_line_shows_explained_variance_and_the_k1_penalty_in_the_reward():
    text = StepLine.of(pipeline("ppo")).render({**RECORD, "rewards/kl_penalty": 0.002, "value/explained_variance": 0.4,
                                                "loss/value": 0.1, "clip_frac": 0.1})
    assert "kl_pen(k1)=0.002" in text and "ev=0.4" in text and "vf=0.1" in text and "clip=0.1" in text


def test_vc_ppo_step_line_says_which_phase_is_active():
    line = StepLine.of(pipeline("vc_ppo"))
    assert "phase=critic only" in line.render({**RECORD, "step": 5})
    assert "phase=all" in line.render({**RECORD, "step": 21})
    assert "phase" not in StepLine.of(pipeline("grpo")).render(RECORD)


def test_summary_is_sorted_with_throughput_and_names_before_and_after():
    summary = {"pipeline": "grpo", "steps": 1, "seconds": 1.5, "reward/start": 0.2, "reward/end": 0.5, "reward/window": 1,
               "nodes": {"generate": {"total_s": 1.0, "mean_s": 1.0, "tokens_per_s": 900.0},
                         "loss": {"total_s": 2.0, "mean_s": 2.0, "tokens_per_s": 450.0}},
               "eval_before": {"eval/accuracy": 0.3}, "eval_after": {"eval/accuracy": 0.55}, "out_dir": "runs/x"}
    text = render(summary_table(summary), width=100)
    assert "grpo: 1 step in 1.5s" in text
    rows = [line for line in text.splitlines() if "generate" in line or "│ loss" in line]
    assert "loss" in rows[0] and "450" in rows[0] and "900" in rows[1]
    lines = summary_lines(summary)
    assert "reward: 0.2 at the start -> 0.5 at the end (mean of the first and last 1 step)" in lines
    assert "held-out greedy accuracy: 30.0% before -> 55.0% after (+25.0 points)" in lines


def test_plain_output_keeps_a_step_line_every_n_steps():
    c = Console(width=100, record=True, color_system=None, force_terminal=False)
    view = LiveView(c, steps=10, every=7)
    view.start(None)
    view.step(7, RECORD)
    view.step(8, {**RECORD, "step": 8})
    text = c.export_text()
    assert "step 7/10  reward=0.625  pg=-0.01  0.50s" in text
    assert "step 8" not in text  # every `every` steps, and the last
    assert view.live is None


def test_live_view_on_a_terminal_keeps_step_lines_above_the_table():
    c = Console(width=100, record=True, color_system=None, force_terminal=True)
    view = LiveView(c, steps=10, every=2)
    view.start(None)
    for step in (1, 2, 3, 4):
        view.step(step, {**RECORD, "step": step})
    view.close()
    text = c.export_text()
    assert "generate" in text and "share" in text and "4/10" in text
    assert "step 2/10  reward" in text and "step 4/10  reward" in text and "step 3/10  reward=0.625  pg" not in text.split("step 4/10")[0].split("step 2/10")[-1]


def test_setup_is_shown_and_timed_apart_from_training():
    c = Console(width=100, record=True, color_system=None, force_terminal=False)
    view = LiveView(c, steps=2)
    view.doing("importing torch")
    view.done("imported torch")
    build = view.building("builtin:tiny-arith", 200)  # the observer of the run that builds the model
    build.start(None)
    build.step(50, RECORD)
    build.end({"steps": 200, "seconds": 40.0, "eval_after": {"eval/accuracy": 0.238}})
    view.start(None)
    view.end({"pipeline": "grpo", "steps": 2, "seconds": 3.0, "nodes": {}, "eval_before": {}, "eval_after": {},
              "out_dir": "runs/x"})
    text = c.export_text()
    assert "imported torch in " in text
    assert "building builtin:tiny-arith: step 50/200" in text
    assert "built builtin:tiny-arith (200 steps in 40.0s; held-out greedy accuracy 23.8%)" in text
    assert "set-up done in" in text and "training 3.0s, total wall time" in text


def test_setup_on_a_terminal_draws_the_build_progress_bar():
    c = Console(width=100, record=True, color_system=None, force_terminal=True)
    view = LiveView(c, steps=2)
    view.doing("placing actor (builtin:tiny-arith)")
    build = view.building("builtin:tiny-arith", 200)
    build.step(100, RECORD)
    view.setup.live.refresh()
    text = c.export_text()
    view.close()
    assert "placing actor" in text and "building builtin:tiny-arith" in text and "100/200" in text


def test_fanout_passes_every_event_on():
    got = []

    class Rec:
        def step(self, step, record):
            got.append(("step", step))

        def samples(self, step, lines):
            got.append(("samples", len(lines)))

    fan = Fanout(Rec(), None, Rec())
    fan.step(3, RECORD)
    fan.samples(3, [{}])
    fan.message("ignored by observers without it")
    assert got == [("step", 3), ("step", 3), ("samples", 1), ("samples", 1)]
    with pytest.raises(AttributeError):
        fan.no_such_event


def test_graph_flow_line_hides_data_edges_and_shows_phase_effects():
    pg = build(load_pipeline(PIPES / "grpo.py"))
    assert flow_line(pg) == "generate → {score, ref_logprob} → advantage → loss"
    text = render(render_graph(pg), width=120)
    assert "generate → {score, ref_logprob} → advantage → loss" in text and "← data" not in text
    assert "update: 1 epoch x 1 mini-batch" in text and "5 nodes, 2 models" in text
    assert "← data: prompt_ids, prompt_mask" in render(render_graph(pg, everything=True), width=200)
    vc = render(render_graph(build(load_pipeline(PIPES / "vc_ppo.py"))), width=160)
    assert "update: 2 epochs x 2 mini-batches" in vc
    assert "idle in steps 1-20 (the phase trains only critic)" in vc
    assert vc.index("idle in steps") > vc.index("loss [loss:clip]") and "value_loss" not in vc.split("idle in steps")[0].split("loss [loss:clip]")[-1]


def test_graph_colours_each_node_by_its_model():
    tree = render_graph(build(load_pipeline(PIPES / "ppo.py")))
    styles = {}

    def walk(t):
        label = t.label
        if hasattr(label, "spans") and label.spans and "@" in label.plain:
            styles[label.plain.split()[0]] = label.spans[0].style
        for child in t.children:
            walk(child)

    walk(tree)
    assert styles["generate"] == styles["loss"]  # both run the actor
    assert styles["value"] == styles["value_loss"] != styles["loss"]  # the critic has its own colour
    assert styles["ref_logprob"] not in (styles["loss"], styles["value"])


@pytest.mark.parametrize("n", [1, 5, 59, 60, 61, 300, 1000])
def test_sparkline_is_never_wider_than_its_width(n):
    assert 1 <= len(sparkline([float(i % 7) for i in range(n)], 60)) <= 60


@pytest.mark.parametrize("width", [30, 60, 97])
def test_line_chart_fits_its_width(width):
    s = [Series("a", [1, 2, 3, 4], [0.1, 0.5, 0.2, 0.9]), Series("b", [1, 2, 3, 4], [0.3, 0.3, 0.4, 0.1], "magenta")]
    text = line_chart("reward/mean", s, width, 5).plain
    assert all(len(line) <= width for line in text.splitlines())
    assert "b: last 0.1" in text
    assert "a: last 0.9  min 0.1  max 0.9" in text if width > 40 else "a: last 0.9  min 0.1  max 0…" in text
