"""Combine toy-world benchmark runs made on the same items into one table, with each SepEn method's mean over its
finetune seeds.

    python -m toyworld.combine RUN_DIR [RUN_DIR ...] --out DIR   # each RUN_DIR: a toyworld.benchmark results.json
    python -m toyworld.combine main new:TAG --out DIR   # new's methods are named NAME-TAG (before a seed suffix)

A full benchmark (every method, 3 finetune seeds, 400 items per group) is hours of one CPU core, more than a
session has beside its other work; run it in parts (a method family or a seed per run, `--methods`) and combine
them here. Runs combine only when they sampled the same items: the same model, items per group and item seed, and
for every group they share, the same base-model outcome on every item (the base model is deterministic, so this
checks the seeds and the code alike). A method may come from several runs when each ran it on other groups (a long
method split by group over two processes). Writes combined.json and combined.md into DIR.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from sepen_core.stats import paired_mean_difference
from toyworld.benchmark import GROUPS, per_pair, per_pair_cell

SEED_SUFFIX = re.compile(r"-s(\d+)$")  # sepen-pairs-s1: the method family sepen-pairs, finetune seed 1
SEED_LABEL = re.compile(r"\s*\(seed \d+\)$")


class CombineError(ValueError):
    """The runs cannot be combined (they did not sample the same items, or name a method twice)."""


def bits(outcomes: str) -> list[bool]:
    return [c == "1" for c in outcomes]


def combine(reports: list[dict], sources: list[str]) -> dict:
    """One report of several runs' methods; `seed_means`: each method family run with two or more finetune seeds,
    per group its per-item mean over the seeds against the base model (sepen_core.stats.paired_mean_difference)."""
    first = reports[0]
    for report, source in zip(reports[1:], sources[1:], strict=True):
        if report["model"] != first["model"]:
            raise CombineError(f"{source}: model {report['model']!r}, not {first['model']!r}")
        for key in ("items_per_group", "seed"):
            if report["config"][key] != first["config"][key]:
                raise CombineError(f"{source}: {key} {report['config'][key]}, not {first['config'][key]}")
    base: dict[str, tuple[str, str]] = {}  # group -> (outcomes, the run they came from)
    methods: dict[str, dict] = {}
    for report, source in zip(reports, sources, strict=True):
        for group, outcomes in report["methods"]["base"]["outcomes"].items():
            if group in base and base[group][0] != outcomes:
                raise CombineError(
                    f"{source}: the base model's outcomes on {group} differ from {base[group][1]}'s: not the same items"
                )
            base.setdefault(group, (outcomes, source))
        for name, row in report["methods"].items():
            if name in methods and name != "base":
                earlier = methods[name]
                if set(row["outcomes"]) & set(earlier["outcomes"]):
                    raise CombineError(f"{source}: method {name} is also in {earlier['source']} on the same groups")
                for key in ("outcomes", "summary", "vs_base"):  # a run of the method on other groups: its other part
                    earlier[key] = {**earlier.get(key, {}), **row.get(key, {})}
                earlier["source"] = f"{earlier['source']} + {source}"
            methods.setdefault(name, {**row, "source": source})
    methods["base"] = {**methods["base"], "outcomes": {g: o for g, (o, _) in base.items()}}
    for report in reports:  # the base row's summaries, from whichever run had each group
        methods["base"].setdefault("summary", {}).update(report["methods"]["base"]["summary"])
    groups = [g for g in GROUPS if g in base]
    prompts = {g: p for report in reports for g, p in report.get("prompts", {}).items()}
    items = first["config"]["items_per_group"]

    def pairs_of(runs_by_group: dict[str, list[list[bool]]]) -> dict:
        return {
            g: per_pair(prompts[g], items, bits(base[g][0]), runs)
            for g, runs in runs_by_group.items()
            if g != "single" and g in prompts
        }

    for name, row in methods.items():
        if name != "base":
            row["per_pair"] = pairs_of({g: [bits(o)] for g, o in row["outcomes"].items()})

    families: dict[str, list[str]] = {}
    for name in methods:
        match = SEED_SUFFIX.search(name)
        if match:
            families.setdefault(name[: match.start()], []).append(name)
    seed_means = {}
    for family, names in sorted(families.items()):
        if len(names) < 2:
            continue
        by_group = {}
        for group in groups:
            runs = [bits(methods[n]["outcomes"][group]) for n in names if group in methods[n]["outcomes"]]
            if len(runs) == len(names):
                difference = paired_mean_difference(bits(base[group][0]), runs)
                by_group[group] = {**difference, "success": sum(map(sum, runs)) / (len(runs) * len(runs[0]))}
        label = SEED_LABEL.sub("", methods[names[0]]["label"])
        seed_means[family] = {
            "label": f"{label}: mean of {len(names)} seeds",
            "methods": names,
            "groups": by_group,
            "per_pair": pairs_of(
                {g: [bits(methods[n]["outcomes"][g]) for n in names] for g in by_group}  # every seed ran the group
            ),
        }
    return {
        "model": first["model"],
        "config": {"items_per_group": first["config"]["items_per_group"], "seed": first["config"]["seed"]},
        "sources": sources,
        "groups": groups,
        "methods": methods,
        "seed_means": seed_means,
    }


def markdown(combined: dict) -> str:
    groups = combined["groups"]
    head = "| method | " + " | ".join(groups) + " |\n|---|" + "---:|" * len(groups) + "\n"
    out = ["### Success (% of items, 95% Wilson interval)\n", head]
    for row in combined["methods"].values():
        cells = []
        for group in groups:
            s = row.get("summary", {}).get(group)
            ci = s and s["success_ci95"]
            cells.append("not run" if s is None else f"{100 * s['success']:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")
        out.append(f"| {row['label']} | " + " | ".join(cells) + " |\n")
    out += ["\n### Paired difference from the base model (points, 95% interval; McNemar p)\n", head]
    for name, row in combined["methods"].items():
        if name == "base":
            continue
        cells = []
        for group in groups:
            d = row.get("vs_base", {}).get(group)
            cells.append(
                "not run"
                if d is None
                else f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]; "
                f"p={d['p_mcnemar']:.2g}"
            )
        out.append(f"| {row['label']} | " + " | ".join(cells) + " |\n")
    if combined["seed_means"]:
        out += [
            "\n### Mean over finetune seeds: success, and the difference from the base model (points, 95% interval "
            "over items; p; each seed's difference)\n",
            head,
        ]
        for family in combined["seed_means"].values():
            cells = []
            for group in groups:
                d = family["groups"].get(group)
                cells.append(
                    "not run"
                    if d is None
                    else f"{100 * d['success']:.1f}: {100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, "
                    f"{100 * d['ci95'][1]:+.1f}]; p={d['p']:.2g}; " + " / ".join(f"{100 * x:+.1f}" for x in d["by_run"])
                )
            out.append(f"| {family['label']} | " + " | ".join(cells) + " |\n")
    pair_groups = [g for g in groups if g != "single"]
    rows = [(r["label"], r.get("per_pair", {})) for n, r in combined["methods"].items() if n != "base"]
    rows += [(f["label"], f.get("per_pair", {})) for f in combined["seed_means"].values()]
    if pair_groups and any(numbers for _, numbers in rows):
        out += [
            "\n### Per pair (both caption orders): the worst and the best pair's difference from the base model in "
            "points (for a mean of seeds: the pair's mean), and how many pairs lose (significantly: in every seed)\n",
            "| method | " + " | ".join(pair_groups) + " |\n|---|" + "---|" * len(pair_groups) + "\n",
        ]
        for label, numbers in rows:
            cells = [per_pair_cell(numbers[g]) if g in numbers else "not run" for g in pair_groups]
            out.append(f"| {label} | " + " | ".join(cells) + " |\n")
    sources = ", ".join(f"`{s}`" for s in combined["sources"])
    items = combined["config"]["items_per_group"]
    out.append(f"\nRuns: {sources}; {items} items per group, model {combined['model']}.\n")
    return "".join(out)


def tagged(report: dict, tag: str) -> dict:
    """The report with every method but the base model renamed NAME-TAG (sepen-per-pair-s0 -> sepen-per-pair-TAG-s0,
    so seeds still group) and labelled "LABEL [TAG]": runs of one method under other code or recipes side by side."""
    methods = {}
    for name, row in report["methods"].items():
        if name == "base":
            methods[name] = row
            continue
        match = SEED_SUFFIX.search(name)
        renamed = f"{name[: match.start()]}-{tag}{match.group(0)}" if match else f"{name}-{tag}"
        methods[renamed] = {**row, "label": f"{row['label']} [{tag}]"}
    return {**report, "methods": methods}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", help="directories of toyworld.benchmark runs (their results.json), each DIR or DIR:TAG"
    )
    parser.add_argument("--out", required=True, help="directory for combined.json and combined.md")
    args = parser.parse_args(argv)
    reports = []
    for run in args.runs:
        directory, _, tag = run.partition(":")
        report = json.loads((Path(directory) / "results.json").read_text())
        reports.append(tagged(report, tag) if tag else report)
    try:
        combined = combine(reports, [str(run) for run in args.runs])
    except CombineError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "combined.json").write_text(json.dumps(combined, indent=1) + "\n")
    (out / "combined.md").write_text(markdown(combined))
    print(markdown(combined))


if __name__ == "__main__":
    main()
