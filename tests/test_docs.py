"""The documents a newcomer reads agree with the code and with the recorded runs they quote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pfedsam.config import config_table_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEFAULT_REPORT = ROOT / "results" / "default" / "report.json"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def expected_result_table(report: dict) -> str:
    """The README's table of the default job: final test Dice per site and the means, 3 decimals."""
    final = report["final"]
    rows = ["| site | personalized Dice | global Dice |", "|---|---|---|"]
    for site in sorted(final):
        rows.append(f"| {site} | {final[site]['personalized']['dice']:.3f} | {final[site]['global']['dice']:.3f} |")
    mean = {w: sum(final[s][w]["dice"] for s in final) / len(final) for w in ("personalized", "global")}
    rows.append(f"| mean | **{mean['personalized']:.3f}** | {mean['global']:.3f} |")
    return "\n".join(rows) + "\n"


def test_config_reference_is_the_generated_table():
    text = (ROOT / "docs" / "config.md").read_text()
    table = text[text.index("| key |"):]
    assert table == config_table_markdown() + "\n", "regenerate: see the top of docs/config.md"


def test_readme_expected_dice_is_the_recorded_run():
    """The recorded run is the committed job with today's settings and budget; the README quotes it."""
    from pfedsam.config import load_config
    from pfedsam.flare.report import budget_facts

    report = json.loads(DEFAULT_REPORT.read_text())
    cfg = load_config(ROOT / "jobs" / "pfedsam" / "app" / "config" / "pfedsam.yaml")
    settings = {"mode": cfg.federation.mode, "backbone": cfg.backbone, "rounds": cfg.federation.rounds,
                "local_steps": cfg.train.local_steps, "global_steps": cfg.train.global_steps,
                "schedule": cfg.train.schedule, "kd_weight": cfg.train.kd_weight, "num_experts": cfg.lmoe.num_experts,
                "placement": cfg.lmoe.placement, "expert_blocks": cfg.lmoe.blocks,
                "global_from_embedding": cfg.train.global_from_embedding,
                "prompt": cfg.prompt, "compression": cfg.federation.compression, **budget_facts(cfg)}
    recorded = {k: report["job"].get(k) for k in settings}
    assert recorded == settings, "results/default was recorded with other settings: re-record it (see its README.md)"
    assert sorted(report["final"]) == [f"site-{i}" for i in range(1, 5)]
    assert [r["round"] for r in report["rounds"]] == list(range(cfg.federation.rounds))
    table = expected_result_table(report)
    assert table in README.read_text(), f"README's expected-result table differs from {DEFAULT_REPORT}:\n{table}"


@pytest.mark.parametrize("text", [
    "pip install -r requirements.txt && pip install -e .",
    "nvflare simulator jobs/pfedsam -w /tmp/pfedsam-ws -n 4 -t 2",
    "python -m pytest -v --durations=15",
])
def test_readme_keeps_the_newcomer_commands(text):
    assert text in README.read_text()
    if "pytest" in text:  # CI runs exactly the README's test command
        assert text in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_document_says_who_it_is_for(path):
    head = path.read_text().splitlines()[:4]
    assert head[0].startswith("# ") and any(line.startswith("**For:**") for line in head), \
        f"{path.name}: the title, then a '**For:** ...' line"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
