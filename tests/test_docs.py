"""docs/nodes.md's settings tables are generated from the code, and stay in step with it."""

import subprocess
import sys
from typing import Annotated

import pytest
from conftest import clean_env
from pydantic import Field, ValidationError

from rlflow import Loss
from rlflow.cli import main
from rlflow.docgen import ALGORITHMS_MD, BEGIN, END, NODES_MD, PIPELINES, UNIFIED_BEGIN, markdown, updated
from rlflow.spec import ADVANTAGES, FILTERS, LOSSES, loss_variant

TOY = "toy_pg_docs_test"  # unique: the registry is global


def test_nodes_md_is_up_to_date_with_the_registries():
    old, new = updated(NODES_MD)
    assert old == new, "docs/nodes.md is out of date with the code: run `rlflow docs --write`"


def test_algorithms_md_has_the_unified_view_of_every_shipped_pipeline_up_to_date():
    old, new = updated(ALGORITHMS_MD)
    assert old == new, "docs/algorithms.md is out of date with the pipelines: run `rlflow docs --write`"
    block = old.split(UNIFIED_BEGIN)[1].split(END)[0]
    for f in sorted(PIPELINES.glob("*.py")):
        if f.name != "__init__.py":
            assert f"| `{f.stem}` |" in block, f.stem


def test_every_shipped_variant_and_setting_is_in_the_tables():
    text = markdown()
    for kind, variants in (("Advantage", ADVANTAGES), ("Filter", FILTERS), ("Loss", LOSSES)):
        for v in variants.variants():
            assert f"**`{kind}(\"{v.name}\")`**" in text
            for p in v.params:
                assert f"| `{p}` |" in text, (v.name, p)
    assert "| `lambda_critic` | `float \\| None` | `None` | ≥ 0, ≤ 1 |" in text  # bounds inside Optional[...]
    assert "| `temperature` | `float \\| None` | `None` | > 0 | default: the Generate node's temperature" in text


@pytest.fixture
def toy_loss():
    """A Loss variant declared here, removed from the global registry afterwards (so the
    up-to-date check above holds whatever order the tests run in)."""

    @loss_variant(needs="logprobs", reads={"advantages": "token"}, coefficient="scale·A")
    def toy_pg_docs_test(cols, counts, *, scale: Annotated[float, Field(gt=0)] = 2.0):
        """A toy policy gradient: -scale · A · lp, summed.

        More prose that the table leaves out.
        """
        return -(scale * cols["advantages"] * cols["logprobs"]).sum()

    yield LOSSES[TOY]
    LOSSES.registry._items.pop(TOY)


def test_a_new_variant_appears_with_its_setting_default_and_bound(toy_loss):
    text = markdown()
    assert f'**`Loss("{TOY}")`**' in text
    assert "| `scale` | `float` | `2.0` | > 0 |  |" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| `{TOY}` |"))
    assert row == f"| `{TOY}` | A toy policy gradient: -scale · A · lp, summed. | `advantages` | — | `logprobs` | scale·A |"
    # the same declaration is the spec a pipeline validates against
    assert Loss(TOY, scale=0.5).scale == 0.5
    with pytest.raises(ValidationError, match="greater than 0"):
        Loss(TOY, scale=0.0)


def test_check_fails_until_written(tmp_path, toy_loss, capsys):
    page = tmp_path / "nodes.md"
    page.write_text(NODES_MD.read_text())  # up to date without the toy variant
    assert main(["docs", "--check", "--file", str(page)]) == 1
    assert main(["docs", "--write", "--file", str(page)]) == 0
    assert TOY in page.read_text() and main(["docs", "--check", "--file", str(page)]) == 0
    text = page.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert text.startswith(NODES_MD.read_text().split(BEGIN)[0])  # only the generated block changed
    capsys.readouterr()


def test_a_page_without_markers_is_a_usage_error(tmp_path, capsys):
    page = tmp_path / "nodes.md"
    page.write_text("# no markers\n")
    assert main(["docs", "--check", "--file", str(page)]) == 2
    assert "markers" in capsys.readouterr().err


def test_docs_prints_the_tables_without_importing_torch():
    code = ("import sys; from rlflow.cli import main; main(['docs']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "### Loss variants" in r.stdout and "| `eps_high` | `float` | `0.28` | > 0 |" in r.stdout
