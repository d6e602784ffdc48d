"""Turn benchmark results into the ratios against the targets, a Markdown table and a plot."""

from __future__ import annotations

from pathlib import Path

OURS = "ours"
PEER_CB = "transformers-serve-cb"


def _level(results: dict, system: str, concurrency: int) -> dict | None:
    for row in results.get("http", []):
        if row["system"] == system and row["concurrency"] == concurrency:
            return row
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def targets(results: dict) -> list[dict]:
    """The targets, each with the measured value and whether it is met."""
    single = (results.get("inprocess") or {}).get("single", {}).get("output_tokens_per_s")
    static = (results.get("inprocess") or {}).get("static", {})
    out: list[dict] = []

    def add(name: str, value: float | None, goal: float, higher_is_better: bool = True) -> None:
        met = None if value is None else (value >= goal if higher_is_better else value <= goal)
        out.append({"target": name, "value": value, "goal": goal, "met": met})

    c1, c16, c64 = (_level(results, OURS, c) for c in (1, 16, 64))
    peer16 = _level(results, PEER_CB, 16)
    if c1:
        add("c=1 tok/s vs in-process generate (>= 0.90)", _ratio(c1["output_tokens_per_s"], single), 0.9)
    if c16:
        add("c=16 tok/s vs static batch 16 (>= 0.80)",
            _ratio(c16["output_tokens_per_s"], (static.get("16") or {}).get("output_tokens_per_s")), 0.8)
        if peer16:
            add("c=16 tok/s vs transformers serve --continuous-batching (>= 1.5)",
                _ratio(c16["output_tokens_per_s"], peer16["output_tokens_per_s"]), 1.5)
            add("c=16 TTFT p50 ours / peer (<= 1.0)",
                _ratio(c16["ttft_p50_ms"], peer16["ttft_p50_ms"]), 1.0, higher_is_better=False)
    plain = next((r for r in results.get("http", []) if r["system"] == "ours, plain (same run)"), None)
    constrained = next((r for r in results.get("http", []) if r["system"] == "ours, json_schema"), None)
    if plain and constrained:
        add(f"c={constrained['concurrency']} tok/s with a json_schema vs plain, same run (>= 0.80)",
            _ratio(constrained["output_tokens_per_s"], plain["output_tokens_per_s"]), 0.8)
    c32 = _level(results, OURS, 32)
    if c32 and (results.get("meta") or {}).get("gpu"):
        add("c=32 requests/s on the GPU (>= 20)", c32["requests_per_s"], 20)
    if c64:
        add("c=64 errors (== 0)", c64["errors"], 0, higher_is_better=False)
        add("c=64 tok/s vs static batch 64 (>= 0.70)",
            _ratio(c64["output_tokens_per_s"], (static.get("64") or {}).get("output_tokens_per_s")), 0.7)
    return out


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown(results: dict) -> str:
    lines = ["| system | conc. | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
             "| ITL p99 ms | tok/req | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results.get("http", []):
        lines.append("| " + " | ".join(_fmt(row[k]) for k in (
            "system", "concurrency", "requests_per_s", "output_tokens_per_s", "ttft_p50_ms",
            "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "mean_tokens_per_request")) +
            f" | {row['errors']}/{row['requests']} |")
    inproc = results.get("inprocess") or {}
    if inproc.get("single"):
        s = inproc["single"]
        lines.append(f"| in-process generate, 1 at a time | 1 | {_fmt(s['requests_per_s'])} | "
                     f"{_fmt(s['output_tokens_per_s'])} | | | | | {inproc['output_tokens']} | 0 |")
    for size, s in (inproc.get("static") or {}).items():
        lines.append(f"| in-process static batch | {size} | {_fmt(s['requests_per_s'])} | "
                     f"{_fmt(s['output_tokens_per_s'])} | | | | | {inproc['output_tokens']} | 0 |")
    table = "\n".join(lines)
    rows = ["| target | measured | met |", "|---|---:|---|"]
    for t in results.get("targets", []):
        rows.append(f"| {t['target']} | {_fmt(t['value'])} | "
                    f"{'yes' if t['met'] else ('no' if t['met'] is False else '–')} |")
    cold = results.get("cold_start_s")
    extra = f"\n\nCold start (process start to /health ready): {cold:.1f} s" if cold else ""
    return table + "\n\n" + "\n".join(rows) + extra + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    systems = sorted({row["system"] for row in results.get("http", [])})
    for system in systems:
        rows = sorted((r for r in results["http"] if r["system"] == system),
                      key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        ax_tput.plot(xs, [r["output_tokens_per_s"] for r in rows], marker="o", label=system)
        ax_ttft.plot(xs, [r["ttft_p50_ms"] or float("nan") for r in rows], marker="o", label=system)
    inproc = results.get("inprocess") or {}
    static = inproc.get("static") or {}
    if static:
        xs = sorted(int(k) for k in static)
        ax_tput.plot(xs, [static[str(x)]["output_tokens_per_s"] for x in xs], "k--",
                     marker="s", label="static batch (in-process)")
    if inproc.get("single"):
        ax_tput.axhline(inproc["single"]["output_tokens_per_s"], color="grey", linestyle=":",
                        label="generate, 1 at a time")
    for ax, title, unit in ((ax_tput, "Output throughput", "tokens/s"),
                            (ax_ttft, "Time to first token (p50)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_ttft.set_yscale("log")
    ax_tput.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
