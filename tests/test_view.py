"""What the terminal shows, rendered as colourless text at a fixed width."""

from rich.console import Console

from rlflow.view import LiveView, summary_lines, summary_table, timing_table

RECORD = {
    "step": 7, "seconds": 0.5, "reward/mean": 0.625, "loss/pg": -0.01,
    "nodes": {"generate": {"seconds": 0.2, "rows": 256, "tokens": 900, "tokens_per_s": 4500.0},
              "loss": {"seconds": 0.3, "rows": 256, "tokens": 900, "tokens_per_s": 3000.0}},
}


def render(renderable, width=80):
    c = Console(width=width, record=True, color_system=None, force_terminal=False)
    c.print(renderable)
    return c.export_text()


def test_timing_table_shows_seconds_share_rows_and_throughput():
    text = render(timing_table(RECORD["nodes"]))
    row = next(line for line in text.splitlines() if "generate" in line)
    assert "0.200" in row and "40.0%" in row and "256" in row and "4500" in row
    assert "60.0%" in next(line for line in text.splitlines() if "│ loss" in line)


def test_summary_names_before_and_after():
    summary = {"pipeline": "grpo", "steps": 3, "seconds": 1.5, "nodes": {"generate": {"total_s": 1.0, "mean_s": 0.333}},
               "reward/start": 0.2, "reward/end": 0.5, "eval_before": {"eval/accuracy": 0.3},
               "eval_after": {"eval/accuracy": 0.55}, "out_dir": "runs/x"}
    assert "grpo: 3 steps in 1.5s" in render(summary_table(summary))
    lines = summary_lines(summary)
    assert "held-out greedy accuracy: 30.0% before -> 55.0% after (+25.0 points)" in lines


def test_plain_output_when_not_a_tty():
    c = Console(width=100, record=True, color_system=None, force_terminal=False)
    view = LiveView(c, steps=10, every=7)
    view.start(None)
    view.step(7, RECORD)
    view.step(8, {**RECORD, "step": 8})
    text = c.export_text()
    assert "step 7  reward/mean=0.625  loss/pg=-0.01  0.50s" in text
    assert "step 8" not in text  # plain mode prints every `every` steps
    assert view.live is None


def test_live_view_on_a_terminal_draws_the_table():
    c = Console(width=100, record=True, color_system=None, force_terminal=True)
    view = LiveView(c, steps=10)
    view.start(None)
    view.step(7, RECORD)
    view.close()
    text = c.export_text()
    assert "generate" in text and "share" in text and "7/10" in text
