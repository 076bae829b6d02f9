"""The run report: what every site sent each round, its Dice, and the final per-site table.

Pure Python (no nvflare import). The server writes ``report.json`` and ``report.md`` into its
run folder after every round, so a run that stops early still leaves what it did.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ..config import PFedSAMConfig
from ..fileio import atomic_write
from ..train.rounds import plan_steps


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.4f}"
    return "-" if value is None else str(value)


class RunReport:
    """Accumulates per-round contributions and final results; writes JSON and Markdown.

    Arguments:
      job (dict): run identity and settings to record (job name, mode, backbone, rounds, ...).
    """

    def __init__(self, job: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = {"job": dict(job or {}), "rounds": [], "final": {}, "started": time.time()}
        self._round_start: dict[int, float] = {}

    def _round(self, rnd: int) -> dict[str, Any]:
        for entry in self.data["rounds"]:
            if entry["round"] == rnd:
                return entry
        entry = {"round": rnd, "sites": {}, "wall_time_s": None, "accepted": 0, "rejected": 0}
        self.data["rounds"].append(entry)
        return entry

    def start_round(self, rnd: int) -> None:
        self._round_start[rnd] = time.time()
        self._round(rnd)

    def add_contribution(
        self, rnd: int, site: str, names: list[str], nbytes: int, metrics: dict[str, Any],
        accepted: bool, reason: str | None = None, num_steps: float | None = None,
    ) -> None:
        entry = self._round(rnd)
        entry["sites"][site] = {
            "accepted": accepted, "reason": reason, "bytes_received": int(nbytes), "num_steps": num_steps,
            "param_names": sorted(names), "metrics": metrics, "weight": None,
        }
        entry["accepted" if accepted else "rejected"] += 1

    def reject(self, rnd: int, site: str, reason: str) -> None:
        """Turn a contribution accepted at arrival into a rejection (a round-level check refused it)."""
        entry = self._round(rnd)
        c = entry["sites"][site]
        if c["accepted"]:
            entry["accepted"] -= 1
            entry["rejected"] += 1
        c["accepted"], c["reason"], c["weight"] = False, reason, None

    def set_weight(self, rnd: int, site: str, weight: int) -> None:
        self._round(rnd)["sites"][site]["weight"] = weight

    def add_missing(self, rnd: int, site: str, reason: str) -> None:
        """A site that sent nothing this round: recorded with the reason, never silently dropped."""
        entry = self._round(rnd)
        entry.setdefault("missing", {})[site] = reason

    def end_round(self, rnd: int, global_changed: bool) -> None:
        entry = self._round(rnd)
        start = self._round_start.get(rnd)
        entry["wall_time_s"] = None if start is None else round(time.time() - start, 3)
        entry["global_updated"] = global_changed

    def add_final(self, site: str, results: dict[str, Any]) -> None:
        self.data["final"][site] = results

    def to_markdown(self) -> str:
        job = self.data["job"]
        lines = [f"# pFedSAM run report: {job.get('name', '')}", ""]
        if job:
            lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in job.items()] + [""]
        lines += ["## Rounds", "", "| round | sites accepted | sites rejected | global updated | wall time s |",
                  "|---|---|---|---|---|"]
        for entry in self.data["rounds"]:  # the round's wall time once, not on every site's row
            updated = {True: "yes", False: "no"}.get(entry.get("global_updated"), "-")
            lines.append(f"| {entry['round']} | {entry.get('accepted', 0)} | {entry.get('rejected', 0)} | {updated} | "
                         f"{_fmt(entry.get('wall_time_s'))} |")
        lines += ["", "## Sites per round", "", "| round | site | accepted | personalized val Dice | global val Dice | "
                  "bytes received | steps |", "|---|---|---|---|---|---|---|"]
        for entry in self.data["rounds"]:
            for site, c in sorted(entry["sites"].items()):
                m = c["metrics"]
                acc = "yes" if c["accepted"] else f"no: {c['reason']}"
                lines.append(f"| {entry['round']} | {site} | {acc} | {_fmt(m.get('val_dice_personalized'))} | "
                             f"{_fmt(m.get('val_dice_global'))} | {c['bytes_received']:,} | {_fmt(c['num_steps'])} |")
            for site, why in sorted(entry.get("missing", {}).items()):
                lines.append(f"| {entry['round']} | {site} | missing: {why} | - | - | 0 | - |")
        if self.data["final"]:
            lines += ["", "## Final (test split)", "", "| site | personalized Dice | personalized HD95 | "
                      "global Dice | global HD95 | test images | export |", "|---|---|---|---|---|---|---|"]
            for site, r in sorted(self.data["final"].items()):
                p, g = r.get("personalized", {}), r.get("global", {})
                lines.append(f"| {site} | {_fmt(p.get('dice'))} | {_fmt(p.get('hd95'))} | {_fmt(g.get('dice'))} | "
                             f"{_fmt(g.get('hd95'))} | {_fmt(p.get('n'))} | {r.get('export', '-')} |")
            means = final_means(self.data["final"])
            if means:
                lines.append(f"| **mean** | {_fmt(means['personalized'])} | | {_fmt(means['global'])} | | | |")
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.data["written"] = time.time()
        text = json.dumps(self.data, indent=1, default=str)
        atomic_write(folder / "report.json", lambda tmp: Path(tmp).write_text(text))
        markdown = self.to_markdown()
        atomic_write(folder / "report.md", lambda tmp: Path(tmp).write_text(markdown))
        return folder / "report.json"


def budget_facts(cfg: PFedSAMConfig) -> dict[str, Any]:
    """The step budget per site for the report header: phases per round, final phases, totals."""
    plan = plan_steps(cfg)

    def phases(p: tuple) -> str:
        return " + ".join(f"{name} {n}" for name, n in p) or "none"

    rounds = sorted({phases(r) for r in plan.rounds})
    return {"round_phases": " / ".join(rounds), "final_phases": phases(plan.final),
            "steps_per_site": plan.total_steps, "images_per_site": plan.total_images}


def final_means(final: dict[str, Any]) -> dict[str, float]:
    """Mean test Dice over sites of the personalized and the global models."""
    out = {}
    for which in ("personalized", "global"):
        values = [r[which]["dice"] for r in final.values() if which in r and "dice" in r[which]]
        if values:
            out[which] = float(sum(values) / len(values))
    return out
