"""The compare's report: ``report.md`` (tables: held-out metrics mean ± std over seeds, trainable parameters, step
time against the frozen floor and the reference, bytes saved for backward, per-task losses, the claims) and PNG
plots (training loss against step and against wall time, held-out loss per entry), written by rank 0.

Decision (the wall-time axis): with a profile, an entry's k-th step sits at k × its profiled median step time (all
entries measured interleaved in one process, so machine load hits them alike); the runs' own clocks are used only
without a profile. The runs' clocks are not comparable: they ran one after another, under whatever load the
machine had, and the gradient probes of some entries add a full-gradient pass to each of their steps."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from dist_peft.compare.claims import task_losses, train_losses
from dist_peft.profile.plots import new_figure, save_figure
from dist_peft.profile.report import atomic_write


def _ms(values: Sequence[float], digits: int = 4) -> str:
    """mean ± std (sample std; ± – with one seed)."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = f"{statistics.stdev(values):.{digits}f}" if len(values) > 1 else "–"
    return f"{mean:.{digits}f} ± {std}"


def _elapsed(run: dict) -> list[float]:
    """Seconds of training at the end of each optimizer step (tokens so far / tokens per second so far; a skipped
    step's time counts, its point is left out as its loss is)."""
    out, tokens = [], 0
    for r in run["history"]:
        if "lr" in r:
            tokens += r["tokens"]
            if not r.get("skipped"):
                out.append(tokens / r["tokens_per_s"])
    return out


def _mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]


def _running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` steps: every entry sees the same batches, whose loss differences
    (±0.5 nats here) would otherwise hide the methods' differences."""
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def plot_losses(results: dict[str, list[dict]], path: Path, against_time: bool,
                step_s: dict[str, float] | None = None) -> Path:
    """Mean training loss per entry against the optimizer step, or against time: ``step_s`` (an entry's profiled
    seconds per step) when given, else the runs' own clocks (module docstring)."""
    plt, fig, ax = new_figure(6.4, 3.8)
    steps_run = min(len(train_losses(r)) for runs in results.values() for r in runs)
    window = max(1, steps_run // 8)
    for label, runs in results.items():
        losses = [_running_mean(train_losses(r), window) for r in runs]
        mean = _mean_curve(losses)
        steps = list(range(1, len(mean) + 1))
        if not against_time:
            x = steps
        elif step_s:
            x = [k * step_s[label] for k in steps]
        else:
            x = _mean_curve([_elapsed(r) for r in runs])
        line, = ax.plot(x[:len(mean)], mean, label=label, linewidth=1.4)
        if len(runs) > 1:
            lo = [min(c[i] for c in losses) for i in range(len(mean))]
            hi = [max(c[i] for c in losses) for i in range(len(mean))]
            ax.fill_between(x[:len(mean)], lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel(("steps × profiled step time (s)" if step_s else "wall time of training (s)") if against_time
                  else "optimizer step")
    ax.set_ylabel("training loss (nats / token)")
    seeds = max(len(r) for r in results.values())
    ax.set_title(f"training loss ({window}-step running mean), mean of {seeds} seed(s)"
                 + (", band: min–max" if seeds > 1 else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return save_figure(plt, fig, path)


def plot_heldout(results: dict[str, list[dict]], path: Path) -> Path:
    plt, fig, ax = new_figure(6.4, 3.2)
    labels = list(results)
    losses = [[r["eval_after"]["eval_loss"] for r in results[k]] for k in labels]
    means = [statistics.fmean(v) for v in losses]
    errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in losses]
    ax.bar(labels, means, yerr=errs, capsize=4, color="#4c72b0")
    lo = min(m - e for m, e in zip(means, errs))
    hi = max(m + e for m, e in zip(means, errs))
    ax.set_ylim(lo - 0.15 * (hi - lo + 1e-6), hi + 0.15 * (hi - lo + 1e-6))
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title("held-out loss after training, mean ± std over seeds")
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(plt, fig, path)


def markdown(spec: Any, results: dict[str, list[dict]], prof: dict[str, Any] | None,
             claims: list[dict[str, Any]]) -> str:
    first = next(iter(results.values()))[0]
    metrics = [k for k in ("eval_loss", "eval_ppl", "eval_accuracy") if k in first["eval_after"]]
    lines = [f"# Compare: {len(results)} entries × {len(spec.seeds)} seed(s) {list(spec.seeds)}", "",
             f"Budget rule: **{spec.rule}**" + (f" (reference {spec.reference})" if spec.rule != "steps" else "")
             + (f", {spec.seconds:g} s" if spec.seconds else "") + ". Held-out figures are mean ± std over seeds.",
             "", "Seeds set the adapters' initialisation" + (
                 " and the training data order (the held-out sets are fixed)." if spec.vary_data_order
                 else "; the data order and the held-out sets are fixed."), ""]
    head = ["entry", "method", "size", "trainable", "steps"] + [m[5:] for m in metrics]
    ranked = any(r["update_rank"] for runs in results.values() for r in runs)
    if ranked:
        head.append("rank(W_T − W_0), min–median over sites")
    if prof:
        head += ["× frozen", f"× {spec.reference}", "saved for backward (MiB)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    from dist_peft.methods.base import get_method

    for label, runs in results.items():
        knob = get_method(runs[0]["method"]).adapter_cls.size_knob
        size = runs[0]["options"].get(knob)
        row = [label, runs[0]["method"], "–" if not knob else f"{knob}={size:.4g}" if isinstance(size, float)
               else f"{knob}={size}",
               f"{runs[0]['trainable']:,}", str(runs[0]["steps"])]
        row += [_ms([r["eval_after"][m] for r in runs]) for m in metrics]
        if ranked:
            row.append(", ".join(f"{min(r['update_rank'].values())}–{statistics.median_low(r['update_rank'].values())}"
                                 for r in runs) if runs[0]["update_rank"] else "–")
        if prof:
            p = prof["entries"][label]
            saved = p["saved_for_backward_bytes"]
            row += [f"{p['vs_frozen']:.2f}" if p["vs_frozen"] else "–", f"{p['vs_reference']:.2f}",
                    f"{saved / 2**20:.1f}" if saved is not None else "–"]
        lines.append("| " + " | ".join(row) + " |")
    if prof:
        lines += ["", f"Step times: one interleaved profile of every entry ({prof['steps']} measured steps each, "
                  f"{prof['world']} rank(s) on {prof['device']}, seed {spec.seeds[0]}); ratios from that one run."]
    tasks = sorted({t for runs in results.values() for r in runs for t in task_losses(r)})
    if tasks:
        lines += ["", "## Held-out loss per task", "", "| entry | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for label, runs in results.items():
            lines.append(f"| {label} | " + " | ".join(_ms([task_losses(r)[t] for r in runs]) for t in tasks) + " |")
    lines += ["", "## The papers' claims", "",
              "Supported: the difference has the paper's sign and Welch's t-test over seeds gives p < 0.05; "
              "otherwise not separable at this scale (or contradicted when significant the other way).", "",
              "| method | claim | metric | ours | theirs | p | verdict |", "|---|---|---|---|---|---|---|"]
    for c in claims:
        vals = c.get("values", {})
        ours = f"{c['ours']}: {_ms(vals[c['ours']])}" if c["ours"] in vals else (c["ours"] or "–")
        theirs = f"{c['theirs']}: {_ms(vals[c['theirs']])}" if c["theirs"] in vals else (
            f"r = {c['r']}" if "r" in c else (c["theirs"] or "–"))
        p = f"{c['p']:.3g}" if c.get("p") is not None else "–"
        lines.append(f"| {c['claim']} | {c['paper']} | {c['metric']} | {ours} | {theirs} | {p} | {c['verdict']} |")
    lines += ["", "![training loss against step](loss_vs_step.png)", "",
              "![training loss against wall time](loss_vs_time.png)", "", "![held-out loss](heldout.png)", ""]
    return "\n".join(lines)


def write_report(spec: Any, results: dict[str, list[dict]], prof: dict[str, Any] | None,
                 claims: list[dict[str, Any]]) -> list[Path]:
    out = spec.out
    paths = [plot_losses(results, out / "loss_vs_step.png", against_time=False),
             plot_losses(results, out / "loss_vs_time.png", against_time=True,
                         step_s={k: v["median_s"] for k, v in prof["entries"].items()} if prof else None),
             plot_heldout(results, out / "heldout.png")]
    atomic_write(out / "claims.json", json.dumps(claims, indent=2))
    atomic_write(out / "report.md", markdown(spec, results, prof, claims))
    return [out / "report.md", out / "claims.json", *paths]
