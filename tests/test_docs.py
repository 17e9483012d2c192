"""Generated documentation: the settings tables in the docs are the config classes' fields."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from r2led.cli import app
from r2led.config import model_config_class, replace_marked, settings_table
from r2led.errors import ConfigError

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("page", ["method.md", "sid.md"])
def test_the_settings_tables_in_the_docs_match_the_config_classes(page):
    result = CliRunner().invoke(app, ["docs", "settings", str(DOCS / page), "--check"])
    assert result.exit_code == 0 and "up to date" in result.output, (
        f"{page} differs from the code: run `r2led docs settings docs/{page}`"
    )


def test_method_md_lists_every_r2led_switch_with_its_default():
    text = (DOCS / "method.md").read_text()
    for name in model_config_class("r2led").model_fields:
        if name != "name":
            assert f"| `model.{name}` |" in text, name
    assert "| `model.rho` | `0.75` | [0, 1] | mix ratio" in text


class _Demo(BaseModel):
    name: str = "demo"
    k: int = Field(20, ge=1, le=100, description="behaviours per route")
    mode: Literal["a", "b"] = Field("a", description="which mode")
    gate: bool = Field(True, description="the gate")
    cap: int | None = Field(None, ge=1, le=9, description="an optional cap")
    quiet: int = 3  # no description: not a documented setting


def test_a_table_row_gives_the_default_the_values_and_the_meaning():
    table = settings_table(_Demo, "demo.", shared=None).splitlines()
    assert table == [
        "| setting | default | values | meaning |",
        "|---|---|---|---|",
        "| `demo.k` | `20` | [1, 100] | behaviours per route |",
        "| `demo.mode` | `a` | `a`, `b` | which mode |",
        "| `demo.gate` | on | on, off | the gate |",
        "| `demo.cap` | unset | [1, 9], or unset | an optional cap |",
    ]


def test_a_page_whose_table_drifted_is_rewritten_and_check_fails_on_it(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- settings:sid -->\n| stale |\n<!-- /settings:sid -->\nafter\n")
    check = CliRunner().invoke(app, ["docs", "settings", str(page), "--check"])
    assert check.exit_code == 3 and "differ from the code" in check.output and "| stale |" in page.read_text()
    assert CliRunner().invoke(app, ["docs", "settings", str(page)]).exit_code == 0
    text = page.read_text()
    assert text.startswith("intro\n<!-- settings:sid -->\n| setting |") and text.endswith(
        "<!-- /settings:sid -->\nafter\n"
    )
    assert "| `levels` | `3` | [1, 64] | semantic levels L |" in text


def test_markers_must_stand_once_and_in_order():
    with pytest.raises(ConfigError, match="expected one <!-- x --> ... <!-- /x --> block"):
        replace_marked("<!-- /x --> <!-- x -->", "x", "")
    with pytest.raises(ConfigError):
        replace_marked("no markers", "x", "")
