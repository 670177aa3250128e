"""`--seeds`: the whole Penn comparison once per seed, summarised as mean and spread per method and metric."""

import statistics

from .generation import METRICS, REWARDS

SUMMARY_METRICS = (*METRICS, *REWARDS)


def aggregate(metrics_by_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """`{seed: {method: {metric: value}}}` -> `{method: {metric: {"mean", "std", "min", "max", "values"}}}`.

    `std` is the sample standard deviation across seeds (0 for one seed); a metric a method does not have (`None`,
    e.g. the chosen reward of SFT) is left out.
    """
    methods = next(iter(metrics_by_seed.values()))
    summary = {}
    for method in methods:
        summary[method] = {}
        for metric in SUMMARY_METRICS:
            values = [by_method[method][metric] for by_method in metrics_by_seed.values()]
            if any(value is None for value in values):
                continue
            summary[method][metric] = {
                "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "values": values,
            }
    return summary


def seeds_report(summary: dict[str, dict[str, dict]], seeds: list[int], header: str) -> str:
    """A Markdown table of mean +- standard deviation (min-max) per method and metric."""
    lines = [
        "# Penn experiment over seeds", "", header, "",
        f"Seeds {', '.join(map(str, seeds))}: mean ± sample standard deviation (min to max) across seeds; each seed's "
        "own report is in `seed-<N>/report.md`.", "",
        "| method | " + " | ".join(metric.replace("_", " ") for metric in SUMMARY_METRICS) + " |",
        "| --- |" + " --- |" * len(SUMMARY_METRICS),
    ]
    for method, by_metric in summary.items():
        cells = [f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f} to {s['max']:.3f})" if (s := by_metric.get(m))
                 else "" for m in SUMMARY_METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
