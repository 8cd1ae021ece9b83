"""Reading a study back: `search table` (the notes' format, Markdown) and `search report` (HTML).

The table follows the notes' format, measured beside reported values, with each trial's state
("pruned at epoch 12", "failed: diverged at epoch 3"); a study with a `table: {rows, columns}`
pivot (accuracy versus batch size per optimiser, or by K and H) also gets that grid. The report
is one self-contained HTML file built from Optuna's own plotly figures, plotly.js inlined.
"""

from __future__ import annotations

import html
import math
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import optuna

from search.inputs.constraints import feasible
from search.inputs.objectives import best_first, epochs_run, pareto_numbers, primary, study_objectives
from search.inputs.settings import trial_config
from search.study.lineage import (
    DONOR_ATTR,
    MEMBER_ATTR,
    REPLACED_BY_ATTR,
    SCHEDULE_ATTR,
    START_EPOCH_ATTR,
    is_pbt,
    schedule_text,
)
from search.tracking import RUN_ATTR, run_link

State = optuna.trial.TrialState
COLUMNS = ("Test #", "Epochs", "batch_size", "beta/momentum", "weight_decay", "learning_rate",
           "results", "reported", "state")


def _config(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return trial_config(trial)


def describe_state(trial: optuna.trial.FrozenTrial) -> str:
    return _state(trial) + pbt_lineage(trial)


def pbt_lineage(trial: optuna.trial.FrozenTrial) -> str:
    """A PBT segment's member and where it came from, for the table's state column."""
    a = trial.user_attrs
    if MEMBER_ATTR not in a:
        return ""
    origin = (f" from #{a['pbt_parent']} at epoch {a['pbt_start_epoch']}"
              if a.get(DONOR_ATTR) is not None else "")
    return f" · member {a['pbt_member']}{origin}"


def _state(trial: optuna.trial.FrozenTrial) -> str:
    epochs = epochs_run(trial)
    if trial.state == State.COMPLETE:
        return f"complete ({epochs} epochs)"
    if trial.state == State.PRUNED and REPLACED_BY_ATTR in trial.user_attrs:
        return f"replaced at epoch {epochs} (PBT: continues as #{trial.user_attrs['pbt_replaced_by']})"
    if trial.state == State.PRUNED:
        return f"pruned at epoch {epochs}"
    if trial.state == State.FAIL:
        reason = trial.user_attrs.get("fail_reason", "")
        return f"failed: {reason}" if reason else "failed"
    return trial.state.name.lower()


def _pct(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2%}"


def _results(t: optuna.trial.FrozenTrial, names: list[str]) -> str:
    if not t.values:
        return ""
    parts = []
    for name, v in zip(names, t.values, strict=True):
        parts.append(f"Val Acc: {_pct(v)}" if name == "val_acc" else
                     f"{name} {v:.1f}" if name == "seconds" else f"{name} {v:.0f}")
    return ", ".join(parts)


NOTES_PARAMS = {"batch_size", "momentum", "weight_decay", "lr"}  # the notes' own columns


def table(study: optuna.Study) -> tuple[list[str], list[list[str]], list[optuna.trial.FrozenTrial]]:
    """The notes' columns, then any other searched setting; labelled (fixed) trials first in
    file order, then the rest best first. Epochs are those a trial ran (a pruned trial's, not
    its plan); a multi-objective study's Pareto-optimal trials say `Pareto` in the state."""
    names, front = study_objectives(study), pareto_numbers(study)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != State.WAITING]
    extra = sorted({k for t in trials for k in t.params} - NOTES_PARAMS)
    header = [*COLUMNS, *extra]  # the notes' columns first, as in their tables
    labelled = [t for t in trials if "label" in t.user_attrs]
    others = sorted((t for t in trials if "label" not in t.user_attrs),
                    key=best_first(study))
    rows = []
    for t in labelled + others:
        c = _config(t)
        lr = c.get("lr")
        rows.append([
            str(t.user_attrs.get("label", f"#{t.number}")),
            str(epochs_run(t) or c.get("epochs", "")), str(c.get("batch_size", "")),
            str(c.get("momentum", "")), f"{c.get('weight_decay', '')}",
            "" if lr is None else f"{lr:.3g}",
            _results(t, names), _pct(t.user_attrs.get("reported")),
            describe_state(t) + (" · Pareto" if t.number in front else "")
            + ("" if feasible(t) else " · infeasible"),
            *[_cell(t.params.get(k, "")) for k in extra],
        ])
    # the notes' numbers exist only for a study file's labelled rows: no empty column otherwise
    at = header.index("reported")
    if not any(r[at] for r in rows):
        header.pop(at)
        for r in rows:
            r.pop(at)
    return header, rows, labelled + others


def _cell(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pivot(study: optuna.Study, rows: str, columns: str) -> tuple[list[str], list[list[str]]]:
    """Best value per (row, column) setting, with trial counts and, for local methods,
    communication rounds."""
    cells: dict[tuple, list[optuna.trial.FrozenTrial]] = defaultdict(list)
    for t in study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED, State.FAIL)):
        c = _config(t)
        cells[(c.get(rows), c.get(columns))].append(t)
    row_keys = sorted({k[0] for k in cells}, key=str)
    col_keys = sorted({k[1] for k in cells}, key=lambda v: (isinstance(v, str), v))
    out = []
    for r in row_keys:
        line = [str(r)]
        for c in col_keys:
            trials = cells.get((r, c), [])
            done = [t for t in trials if t.state == State.COMPLETE and t.values]
            if not done:
                line.append(describe_state(trials[0]) if trials else "")
                continue
            best = min(done, key=best_first(study))
            text = _pct(primary(best))
            if "comm_rounds" in best.user_attrs:
                text += f" ({best.user_attrs['comm_rounds']} rounds)"
            line.append(text + (f" [{len(trials)}]" if len(trials) > 1 else ""))
        out.append(line)
    return [f"{rows} \\ {columns}", *map(str, col_keys)], out


def not_cifar(trials: list[optuna.trial.FrozenTrial]) -> str:
    """The datasets the trials used, when any is not CIFAR-100 ("" when all are)."""
    datasets = {str(_config(t).get("dataset")) for t in trials}
    return ", ".join(sorted(datasets)) if datasets - {"cifar100"} else ""


def render_table(study: optuna.Study) -> str:
    header, rows, _ = table(study)
    parts = [f"### {study.study_name}", "", markdown(header, rows)]
    spec = study.user_attrs.get("table")
    if spec:
        header, rows = pivot(study, spec["rows"], spec["columns"])
        parts += ["", f"Best val accuracy by {spec['rows']} and {spec['columns']}:", "",
                  markdown(header, rows)]
    others = not_cifar(study.get_trials(deepcopy=False))
    if others:
        parts += ["", f"_Measured on {others}, not CIFAR-100._"]
    return "\n".join(parts)


def _figures(study: optuna.Study) -> list[tuple[str, Any]]:
    import plotly.graph_objects as go
    from optuna import visualization as vis

    names = study_objectives(study)
    multi = len(names) > 1
    # a multi-objective study: the front first, then the per-parameter views of val_acc
    target = (lambda t: t.values[0]) if multi else None
    # importances look for low target values unless the study says otherwise: val_acc negated
    low_is_good = (lambda t: -t.values[0]) if multi else None
    figs: list[tuple[str, Any]] = []
    if multi:
        figs.append((f"Pareto front ({' vs '.join(names)})",
                     pareto_front(study, names)))
    figs.append(("Optimisation history", vis.plot_optimization_history(
        study, target=target, target_name=names[0])))
    complete = study.get_trials(deepcopy=False, states=(State.COMPLETE,))
    varying = {k for t in complete for k in t.params
               if len({str(u.params.get(k)) for u in complete}) > 1}
    if len(complete) >= 2 and varying:
        title = f"Parameter importances for {names[0]}"
        try:  # over the parameters that vary: a constant one has no importance to find
            with warnings.catch_warnings():  # "low target values": negated above, on purpose
                warnings.filterwarnings("ignore", message=".*low `target` values")
                figs.append((title, vis.plot_param_importances(
                    study, params=sorted(varying), target=low_is_good, target_name=names[0])))
        except (RuntimeError, ValueError) as exc:
            figs.append((title, go.Figure().add_annotation(
                text=f"not computable: {exc}", showarrow=False)))
    figs.append(("Parallel coordinates", vis.plot_parallel_coordinate(
        study, target=target, target_name=names[0])))
    if not multi:  # multi-objective trials keep no intermediate values
        figs.append(("Learning curves (validation accuracy per epoch)",
                     vis.plot_intermediate_values(study)))
    trials = study.get_trials(deepcopy=False)
    if is_pbt(trials):
        figs.append(("PBT: validation accuracy per member (× where a member copied another)",
                     member_curves(trials)))
    spec = study.user_attrs.get("table")
    if spec:
        fig = go.Figure()
        series: dict[Any, dict[Any, float]] = defaultdict(dict)
        for t in complete:
            c = _config(t)
            key, x = c.get(spec["rows"]), c.get(spec["columns"])
            series[key][x] = max(series[key].get(x, -1.0), primary(t))
        for key, points in sorted(series.items(), key=lambda kv: str(kv[0])):
            xs = sorted(points)
            fig.add_trace(go.Scatter(x=xs, y=[points[x] for x in xs], mode="lines+markers",
                                     name=f"{spec['rows']}={key}"))
        log_x = spec["columns"] == "batch_size"
        fig.update_layout(xaxis_title=spec["columns"], yaxis_title="best val accuracy",
                          xaxis_type="log" if log_x else None)
        figs.append((f"Accuracy versus {spec['columns']} per {spec['rows']}", fig))
    return figs


# Optuna's Pareto plot names its traces in the hover text; one colour and a legend entry each
# instead of its per-trial-number colour bars (whose scale means nothing to a reader)
PARETO_TRACES = {"Best Trial": ("Pareto front", "#d62728"), "Trial": ("dominated", "#1f77b4"),
                 "Feasible Trial": ("feasible, dominated", "#1f77b4"),
                 "Infeasible Trial": ("infeasible (misses a constraint)", "#bbbbbb")}


def pareto_front(study: optuna.Study, names: list[str]) -> Any:
    """Optuna's Pareto-front plot (infeasible trials grey, off the front), coloured by kind."""
    from optuna import visualization as vis

    fig = vis.plot_pareto_front(study, target_names=names)
    for trace in fig.data:
        kind = re.search(r"<extra>(.*)</extra>", trace.hovertemplate or "")
        name, colour = PARETO_TRACES.get(kind.group(1) if kind else "", (trace.name, None))
        trace.update(name=name, showlegend=True)
        if colour is not None:
            trace.marker.update(color=colour, showscale=False)
    fig.update_layout(legend={"orientation": "h", "y": -0.2})
    return fig


def member_curves(trials: list[optuna.trial.FrozenTrial]) -> Any:
    """val_acc against epoch, one line per PBT member through its segments: where it copied a
    donor the line jumps, marked × with the donor's trial."""
    import plotly.graph_objects as go

    fig = go.Figure()
    members: dict[int, list[optuna.trial.FrozenTrial]] = defaultdict(list)
    for t in trials:
        if MEMBER_ATTR in t.user_attrs:
            members[int(t.user_attrs[MEMBER_ATTR])].append(t)
    for index, segs in sorted(members.items()):
        points: dict[int, float] = {}
        for t in sorted(segs, key=lambda t: (t.user_attrs.get(START_EPOCH_ATTR, 0), t.number)):
            start = int(t.user_attrs.get(START_EPOCH_ATTR, 0))
            points.update({e: v for e, v in t.intermediate_values.items() if e > start})
        xs = sorted(points)
        line = fig.add_trace(go.Scatter(x=xs, y=[points[x] for x in xs], mode="lines",
                                        name=f"member {index}", legendgroup=str(index)))
        jumps = [t for t in segs if t.user_attrs.get(DONOR_ATTR) is not None
                 and t.user_attrs[START_EPOCH_ATTR] + 1 in points]
        if jumps:
            line.add_trace(go.Scatter(
                x=[t.user_attrs[START_EPOCH_ATTR] + 1 for t in jumps],
                y=[points[t.user_attrs[START_EPOCH_ATTR] + 1] for t in jumps],
                mode="markers", marker_symbol="x", marker_size=9, showlegend=False,
                legendgroup=str(index), name=f"member {index}",
                text=[f"#{t.number} copied #{t.user_attrs['pbt_parent']}" for t in jumps]))
    fig.update_layout(xaxis_title="epoch", yaxis_title="val_acc")
    return fig


def schedule_html(study: optuna.Study) -> str:
    """The best PBT member's schedule, under the settings."""
    if len(study.directions) > 1:  # PBT has one objective
        return ""
    try:
        best = study.best_trial
    except ValueError:
        return ""
    schedule = best.user_attrs.get(SCHEDULE_ATTR)
    if not schedule:
        return ""
    return (f"<p>PBT: the best member (trial {best.number}) trained with this schedule: "
            f"{html.escape(schedule_text(schedule, _cell))}. <code>search retrain --trial "
            f"{best.number}</code> replays it.</p>")


def html_table(header: list[str], rows: list[list[str]], links: list[str | None] | None = None) -> str:
    """A real HTML table; `links` (one per row) make the first cell a link (the MLflow run)."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = [esc(c) for c in row]
        if links and links[i]:
            cells[0] = f'<a href="{esc(links[i])}">{cells[0]}</a>'
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def run_links(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> list[str | None]:
    """Each trial's MLflow run page, when the study was tracked on an MLflow server."""
    info = study.user_attrs.get("mlflow") or {}
    uri = str(info.get("uri", ""))
    return [run_link(uri, info.get("experiment_id", ""), t.user_attrs[RUN_ATTR])
            if RUN_ATTR in t.user_attrs else None for t in trials]



def settings_html(study: optuna.Study) -> str:
    attrs = study.user_attrs
    items = [("objectives", ", ".join(study_objectives(study))),
             ("settings", attrs.get("settings", "")), ("space", attrs.get("space_path", "")),
             ("MLflow", (attrs.get("mlflow") or {}).get("uri", "")),
             ("trials", f"{len(study.get_trials(deepcopy=False))} in storage")]
    return "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
                            for k, v in items if v) + "</dl>"


def write_report(study: optuna.Study, path: Path) -> Path:
    """One HTML file that opens offline: plotly.js is inlined once, no script URLs."""
    body = []
    for i, (title, fig) in enumerate(_figures(study)):
        body.append(f"<h2>{html.escape(title)}</h2>")
        body.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    retrain = study.user_attrs.get("retrain")
    extra = ""
    if retrain:
        extra = (f"<p>Best configuration retrained on train+val: test accuracy "
                 f"<b>{retrain['test_acc']:.2%}</b> (trial {retrain['trial']}).</p>")
    header, rows, trials = table(study)
    tables = [html_table(header, rows, run_links(study, trials))]
    spec = study.user_attrs.get("table")
    if spec:
        p_header, p_rows = pivot(study, spec["rows"], spec["columns"])
        tables.append(f"<h2>Best val accuracy by {html.escape(spec['rows'])} and "
                      f"{html.escape(spec['columns'])}</h2>" + html_table(p_header, p_rows))
    others = not_cifar(trials)
    if others:
        tables.append(f"<p><em>Measured on {html.escape(others)}, not CIFAR-100.</em></p>")
    doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:.3em .6em;text-align:left}} th{{background:#f3f3f3}}
dt{{font-weight:bold;float:left;clear:left;width:8em}} dd{{margin-left:9em}}</style>
</head><body><h1>Study {html.escape(study.study_name)}</h1>{settings_html(study)}{extra}
{schedule_html(study)}
{''.join(tables)}
{''.join(body)}
</body></html>
"""
    path.write_text(doc)
    return path
