"""``recsys experiment start | status | stop | decide``: online experiments (shadow, split).

Wire with ``app.add_typer(experiment.app, name="experiment")``. Commands parse arguments and
call :mod:`recsys_platform.experiments.lifecycle`. ``decide`` exits 0 whatever it decided and
prints the decision; ``status`` shows the numbers and what ``decide`` would do now.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from recsys_platform.commands.context import current_settings
from recsys_platform.experiments.definition import Experiment, ExperimentError, Guardrails

app = typer.Typer(help="Online experiments: shadow, split (A/B) between champion and "
                       "challenger, decided from the impression log.", no_args_is_help=True)
console = Console()
logger = logging.getLogger(__name__)


def print_experiment(exp: Experiment) -> None:
    console.print(f"experiment [bold]{exp.id}[/]: {exp.mode}, treatment version "
                  f"{exp.treatment_version} vs champion {exp.control_version}, share "
                  f"{exp.share:g}, salt {exp.salt}, metric {exp.primary_metric}, confidence "
                  f"{exp.confidence:.0%}, min {exp.min_samples:,} impressions/arm, max "
                  f"{exp.max_duration_h:g} h, started {exp.started_at} by {exp.started_by}")


def print_report(report: Any, decision: Any) -> None:
    table = Table(title=f"{report.experiment} as of {report.as_of}")
    for column in ("arm", "users", "requests", "impressions", "clicks", report.metric,
                   "fallback rate", "p99 ms", "distinct items"):
        table.add_column(column, justify="right" if column != "arm" else "left")
    for arm in ("control", "treatment"):
        s = getattr(report, arm)
        if s is not None:
            table.add_row(arm, str(s.users), str(s.requests), str(s.impressions), str(s.clicks),
                          f"{s.value:.4f}", f"{s.fallback_rate:.2%}", f"{s.p99_latency_ms:.1f}",
                          str(s.distinct_items))
    console.print(table)
    if report.comparison is not None:
        c = report.comparison
        console.print(f"lift {c.difference:+.4f} ({c.relative_lift:+.1%}), CI "
                      f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}], p = {c.p_value:.3g} ({c.method})")
    if report.srm is not None:
        console.print(f"SRM: {report.srm.control_users} / {report.srm.treatment_users} users, "
                      f"p = {report.srm.p_value:.3g}"
                      f"{' [red]MISMATCH[/]' if report.srm.mismatch else ''}")
    for key, value in report.shadow.items():
        console.print(f"shadow {key}: {value:.4g}")
    console.print(f"pending impressions (label window open or not in the lake yet): "
                  f"{report.pending}")
    console.print(f"decision: [bold]{decision.action}[/] - {'; '.join(decision.reasons)}")


@app.command("start")
def start_cmd(
    why: Annotated[str, typer.Option(help="Reason, recorded on the versions.")],
    treatment: Annotated[str, typer.Option(help="Version number or alias.")] = "challenger",
    mode: Annotated[str, typer.Option(help="split (A/B) or shadow.")] = "split",
    share: Annotated[float | None, typer.Option(
        help="Treatment's share of users (default 0.5 split, 1.0 shadow).")] = None,
    metric: Annotated[str, typer.Option(help="ctr | watch_time_per_request.")] = "ctr",
    confidence: Annotated[float, typer.Option(help="Two-sided confidence.")] = 0.95,
    min_samples: Annotated[int, typer.Option(help="Impressions per arm before deciding.")]
    = 2_000,
    max_hours: Annotated[float, typer.Option(help="Then it ends without promotion.")] = 168.0,
    salt: Annotated[str | None, typer.Option(help="Assignment salt (default: the id).")]
    = None,
    max_p99_ratio: Annotated[float, typer.Option(help="Guardrail: treatment/control p99.")]
    = 1.5,
    max_fallback_increase: Annotated[float, typer.Option(
        help="Guardrail: treatment - control fallback rate.")] = 0.01,
) -> None:
    """Starts an experiment of the treatment against the champion (serving follows within
    one poll interval)."""
    from recsys_platform.experiments import lifecycle

    try:
        exp = lifecycle.start(current_settings(), treatment, mode, share, why=why,
                              primary_metric=metric, confidence=confidence,
                              min_samples=min_samples, max_duration_h=max_hours, salt=salt,
                              guardrails=Guardrails(max_fallback_increase=max_fallback_increase,
                                                    max_p99_ratio=max_p99_ratio))
    except ExperimentError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    print_experiment(exp)


@app.command("status")
def status_cmd() -> None:
    """The running experiment, its numbers now and what decide would do."""
    from recsys_platform.experiments import lifecycle

    settings = current_settings()
    exp = lifecycle.current(settings)
    if exp is None:
        console.print("no experiment is running")
        return
    print_experiment(exp)
    _, report, decision = lifecycle.status(settings)
    print_report(report, decision)


@app.command("stop")
def stop_cmd(why: Annotated[str, typer.Option(help="Reason, recorded on the versions.")]
             ) -> None:
    """Ends the running experiment; the champion keeps all traffic."""
    from recsys_platform.experiments import lifecycle

    try:
        exp = lifecycle.stop(current_settings(), why=why)
    except ExperimentError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    console.print(f"experiment {exp.id} stopped; champion unchanged")


@app.command("decide")
def decide_cmd(
    why: Annotated[str, typer.Option(help="Reason, recorded on the versions.")]
    = "decided by hand",
    etl: Annotated[bool, typer.Option(help="Run the ETL of the experiment's days first.")]
    = True,
) -> None:
    """Runs the decide flow once: promote, roll back, expire or keep running (audited)."""
    from recsys_platform.experiments import lifecycle
    from recsys_platform.flows.data import prefect_api
    from recsys_platform.flows.experiment import experiment_decide_flow

    settings = current_settings()
    if lifecycle.current(settings) is None:
        console.print("no experiment is running")
        return
    with prefect_api(settings):
        result = experiment_decide_flow(why=why, who=_who(), run_etl=etl, settings=settings)
    console.print(f"experiment {result['experiment']}: [bold]{result['decision']}[/] - "
                  f"{'; '.join(result['reasons'])}")


def _who() -> str:
    import getpass

    return getpass.getuser()
