"""``rlflow report``: the terminal dashboard of one or several runs (curves overlaid, time per
node, samples) at a fixed width, and the HTML page, rendered in headless Chromium."""

import json
import math
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from rich.console import Console

from rlflow.charts import HEX, PALETTE, line_chart
from rlflow.cli import main
from rlflow.graph import resolve
from rlflow.loader import load_pipeline
from rlflow.page import html_page
from rlflow.report import chart_keys, dashboard, headline, load_run, series

PIPES = Path(__file__).parent.parent / "pipelines"


def fake_run(root: Path, name: str, steps: int = 30, slope: float = 0.01, finished: bool = True) -> Path:
    """A run directory as the engine writes it, with made-up figures."""
    run = root / name
    run.mkdir(parents=True)
    cfg = resolve(load_pipeline(PIPES / f"{name}.py")).to_config()
    (run / "config.json").write_text(json.dumps(cfg))
    recs = []
    for s in range(1, steps + 1):
        r = {"step": s, "seconds": 0.5, "rows": 16, "reward/mean": 0.2 + slope * s, "reward/exact_match": 0.2 + slope * s,
             "kl/mean": 0.001 * s, "entropy/mean": 1.0 - 0.01 * s, "response_length/mean": 3.0, "grad_norm/actor": 0.5,
             "loss/pg": -0.01, "nodes": {"generate": {"seconds": 0.3, "rows": 16, "tokens": 64, "tokens_per_s": 213.3},
                                         "loss": {"seconds": 0.1, "rows": 16, "tokens": 64, "tokens_per_s": 640.0}}}
        if s == steps // 2:
            r["eval/accuracy"] = 0.4
        recs.append(r)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    samples = [{"step": s, "prompt": "37+45=", "response": "82", "answer": "82", "reward": 1.0} for s in (steps - 1, steps)]
    (run / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in samples))
    if finished:
        summary = {"pipeline": cfg["name"], "steps": steps, "seconds": 15.0, "eval_before": {"eval/accuracy": 0.25},
                   "eval_after": {"eval/accuracy": 0.5}, "reward/start": 0.0, "reward/end": 0.0,
                   "nodes": {}, "out_dir": str(run)}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def text_of(renderable, width):
    c = Console(width=width, record=True, color_system=None, force_terminal=False)
    c.print(renderable)
    return c.export_text()


@pytest.mark.parametrize("width", [60, 100, 160])
def test_dashboard_fits_the_width_and_has_every_part(tmp_path, width):
    run = load_run(fake_run(tmp_path, "grpo"))
    text = text_of(dashboard([run], width, samples=2), width)
    assert max(len(line) for line in text.splitlines()) <= width
    for title in ("reward/mean", "reward/exact_match", "eval/accuracy", "kl/mean", "entropy/mean",
                  "response_length/mean", "grad_norm/actor"):
        assert title in text, title
    assert "time per node — grpo" in text and "generate" in text and "tok/s" in text
    assert "expected '82'" in text and "reward 1" in text  # samples with their expected answer
    assert "min 0.21  max 0.5" in text  # the reward curve's min and max


def test_time_per_node_shows_the_mfu_of_each_nodes_model(tmp_path):
    path = fake_run(tmp_path, "grpo", steps=4)
    recs = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    for i, r in enumerate(recs):  # the actor's MFU 1 %, 2 %, 3 %, 4 %: mean 2.5 %; generate and loss run the actor
        r.update({"perf/mfu/actor": 0.01 * (i + 1), "perf/mfu": 0.02})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = text_of(dashboard([load_run(path)], 120, samples=0), 120)
    bars = [line for line in text.splitlines() if "tok/s" in line]
    assert len(bars) == 2 and all("MFU 2.5%" in line for line in bars), bars
    assert "perf/mfu" in text  # and its curve


def test_reward_start_and_end_is_one_figure(tmp_path):
    """The headline's reward start -> end is the summary's (mean of the first and last k steps)."""
    run = load_run(fake_run(tmp_path, "grpo", steps=30))
    # 30 steps: k = 6; first six rewards 0.21..0.26 (mean 0.235), last six 0.45..0.50 (mean 0.475)
    assert "reward 0.235 -> 0.475 (first/last 6 steps)" in headline(run, "grpo")
    assert "accuracy 25.0% -> 50.0%" in headline(run, "grpo")


def test_eval_curve_has_the_before_and_after_figures(tmp_path):
    run = load_run(fake_run(tmp_path, "grpo", steps=30))
    (s,) = series([run], "eval/accuracy")
    assert s.xs == [0.0, 15.0, 30.0] and s.ys == [0.25, 0.4, 0.5]


def test_several_runs_overlay_on_one_chart_each_in_its_colour(tmp_path):
    runs = [load_run(fake_run(tmp_path, "grpo", slope=0.01), PALETTE[0]),
            load_run(fake_run(tmp_path, "dr_grpo", slope=0.02), PALETTE[1])]
    (a, b) = series(runs, "reward/mean")
    assert (a.label, a.color) == ("grpo", PALETTE[0]) and (b.label, b.color) == ("dr_grpo", PALETTE[1])
    c = Console(width=100, record=True, color_system="truecolor", force_terminal=True)
    c.print(dashboard(runs, 100))
    text = c.export_text(styles=False)
    assert "━━ grpo" in text and "━━ dr_grpo" in text  # the legend
    assert "grpo: last 0.5" in text and "dr_grpo: last 0.8" in text  # one chart, both runs
    chart = line_chart("reward/mean", series(runs, "reward/mean"), 60)
    assert {PALETTE[0], PALETTE[1]} <= {str(sp.style) for sp in chart.spans}  # one chart draws both colours
    assert "time per node — grpo" in text and "time per node — dr_grpo" in text


def test_report_command_takes_several_runs_and_an_unfinished_one(tmp_path, capsys):
    a, b = fake_run(tmp_path, "grpo"), fake_run(tmp_path, "dr_grpo", steps=1, finished=False)
    assert main(["report", str(a), str(b), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "grpo: 30 steps in 15.0s" in out and "dr_grpo: 1 step in 0.5s (did not finish)" in out


def test_html_page_is_self_contained(tmp_path):
    page = html_page([load_run(fake_run(tmp_path, "grpo"), PALETTE[0]), load_run(fake_run(tmp_path, "dr_grpo"), PALETTE[1])])
    assert "<script" not in page and "src=" not in page and "href=" not in page and "@import" not in page
    assert page.count("<svg") >= len(chart_keys([load_run(tmp_path / "grpo")])) + 4  # curves, bars, graphs
    assert "generate → {score, ref_logprob} → advantage → loss" in page  # the run's graph
    assert HEX[PALETTE[0]] in page and HEX[PALETTE[1]] in page


def _chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(n)), None)


def _png_pixels(path: Path) -> set[tuple[int, int, int]]:
    """The distinct RGB colours of an 8-bit RGB or RGBA, non-interlaced PNG (as Chromium writes)."""
    data = path.read_bytes()
    pos, chunks, head = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        head = body if kind == b"IHDR" else head
        chunks += [body] if kind == b"IDAT" else []
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", head[:10])
    assert depth == 8 and ctype in (2, 6), (depth, ctype)
    bpp = 3 if ctype == 2 else 4
    raw, stride, prev, out = zlib.decompress(b"".join(chunks)), w * bpp, bytearray(w * bpp), set()
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a, b, c = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
            p = a + b - c
            pred = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c
            line[i] = (line[i] + (0, a, b, (a + b) // 2, pred)[f]) & 0xFF
        out.update(tuple(line[i:i + 3]) for i in range(0, stride, bpp))
        prev = line
    return out


def _near(color: str, pixels: set) -> bool:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return any(math.dist((r, g, b), p) < 12 for p in pixels)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(tmp_path):
    runs = [fake_run(tmp_path, "grpo"), fake_run(tmp_path, "dr_grpo", slope=0.02)]
    page = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--html", str(page)]) == 0
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(browser + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<polyline") >= 2 * 7 and "rlflow report: grpo, dr_grpo" in dom.stdout  # parsed
    shot = tmp_path / "shot.png"
    r = subprocess.run(browser + [f"--screenshot={shot}", "--window-size=1400,1200", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    pixels = _png_pixels(shot)
    assert _near(HEX[PALETTE[0]], pixels) and _near(HEX[PALETTE[1]], pixels)  # both runs' curves are drawn
    assert len(pixels) > 50  # text, axes and lines, not a blank page
