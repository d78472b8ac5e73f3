"""``recsys stream``: run the PyFlink feature job, replay a range, show its status."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from recsys_core.settings import Settings
from recsys_platform.commands.context import current_settings
from recsys_platform.commands.progress import stage

logger = logging.getLogger(__name__)
app = typer.Typer(help="Streaming features: the PyFlink job that keeps Redis fresh.")


@app.command("run")
def run(
    restore: Annotated[str | None, typer.Option(
        help="A retained chk-N directory, or 'latest', to restart from.")] = None,
) -> None:
    """Runs the stream job until interrupted (source, windows and sink from settings)."""
    from recsys_pipelines.stream.checkpoints import latest_checkpoint
    from recsys_pipelines.stream.job import options_from_settings, start

    options = options_from_settings(current_settings())
    if restore:
        path = latest_checkpoint(Path(options.checkpoint_dir)) if restore == "latest" \
            else Path(restore)
        options = replace(options, restore_from=str(path))
    Console().print(f"stream job reading {options.source} ({options.stream_dir}); Ctrl-C stops")
    start(options).wait()


@app.command("replay")
def replay(
    from_: Annotated[str, typer.Option("--from", help="First event date, YYYY-MM-DD.")],
) -> None:
    """Bounded backfill through the same job: the files present, events on/after a date."""
    from recsys_pipelines.stream.job import options_from_settings, start

    options = options_from_settings(current_settings(), bounded=True,
                                    from_date=date.fromisoformat(from_),
                                    job_name="recsys-stream-replay")
    start(options).wait()
    _print_status(Console(), current_settings())


@app.command("status")
def status() -> None:
    """Checkpoints, written rows, lag, dead-letter and late counts."""
    _print_status(Console(), current_settings())


def _print_status(console: Console, settings: Settings) -> None:
    from recsys_pipelines.stream.job import options_from_settings
    from recsys_pipelines.stream.status import stream_status
    from recsys_platform.display import stream_metric

    s = stream_status(options_from_settings(settings))
    table = Table(title="stream job")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("completed checkpoints", str(s.checkpoints))
    table.add_row("latest checkpoint", s.latest_checkpoint or "-")
    for key, value in s.metrics.items():
        table.add_row(*stream_metric(key, value))
    table.add_row("dead letters", f"{s.dead_letters:,}")
    for reason, count in sorted(s.dead_letter_reasons.items()):
        table.add_row(f"  {reason}", f"{count:,}")
    table.add_row("late rows", f"{s.late:,}")
    console.print(table)


def _short(value: object) -> str:
    if isinstance(value, list | tuple) or getattr(value, "ndim", 0) > 0:  # lists and arrays
        items = list(value)  # type: ignore[call-overload]
        return "[" + ", ".join(map(str, items[:5])) + (", ..." if len(items) > 5 else "") + "]"
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()  # type: ignore[union-attr]
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def demo_step(settings: Settings, console: Console) -> str | None:
    """Demo: start the job in the background, append two bursts of events, and show one
    user's short-term features and one item's trending counts change in the online store.

    Returns:
        The id of the user whose stream features were shown (for the serving demo).
    """
    with stage(console, "stream: PyFlink job -> Redis (Feast layout), read through Feast",
               3) as step:
        step("starting the PyFlink job (Flink mini cluster)")
        user = _stream_bursts(settings, console, step)
    _print_status(console, settings)
    return user


def _stream_bursts(settings: Settings, console: Console, step: Callable[[str], None]) -> str:
    import redis

    from recsys_core.contracts import split_duplicates
    from recsys_core.features import ITEM_TRENDING, USER_STREAM
    from recsys_pipelines.feature_store import apply_definitions, online_features
    from recsys_pipelines.generator import GeneratorConfig, generate, write_jsonl
    from recsys_pipelines.stream.job import options_from_settings, start
    from recsys_pipelines.stream.status import wait_for_window

    store = apply_definitions(settings)
    options = options_from_settings(settings)
    stream_dir = Path(options.stream_dir)
    stream_dir.mkdir(parents=True, exist_ok=True)
    data = generate(GeneratorConfig(events=6_000, days=1, users=40, items=120, seed=99))
    events, _ = split_duplicates(data.events)
    # Squeeze the day into the last two hours before now, in event-time order.
    t = datetime.fromisoformat(events["event_time"].min().replace("Z", "+00:00"))
    now = datetime.now(UTC).replace(microsecond=0)
    start_at = now - timedelta(hours=2)
    times = [start_at + (datetime.fromisoformat(x.replace("Z", "+00:00")) - t) / 12
             for x in events["event_time"]]
    events = events.assign(event_time=[x.strftime("%Y-%m-%dT%H:%M:%S.000Z") for x in times])
    events = events.sort_values("event_time").reset_index(drop=True)
    half = len(events) // 2
    user = str(events["user_id"].value_counts().index[0])
    item = str(events["item_id"].value_counts().index[0])

    result = start(options)
    client = redis.Redis.from_url(settings.redis.url)
    try:
        for i, part in enumerate((events.iloc[:half], events.iloc[half:])):
            step(f"burst {i + 1}: appending events, waiting for their windows")
            write_jsonl(part, stream_dir / f"demo-{now:%Y%m%dT%H%M%S}-{i}.jsonl")
            last = datetime.fromisoformat(part["event_time"].max().replace("Z", "+00:00"))
            closed = last - timedelta(seconds=options.out_of_orderness_s)
            slide_ms = int(ITEM_TRENDING.slide.total_seconds() * 1000)  # type: ignore[union-attr]
            end_ms = int(closed.timestamp() * 1000) // slide_ms * slide_ms
            ok = wait_for_window(client, options.sink.metrics_key, ITEM_TRENDING.name, end_ms,
                                 timeout_s=120)
            console.print(f"burst {i + 1}: {len(part):,} events appended; "
                          f"{'windows written' if ok else 'still catching up'}")
            for entity, key, view in (("user", user, USER_STREAM.name),
                                      ("item", item, ITEM_TRENDING.name)):
                row = online_features(store, entity, [key], (view,)).iloc[0]
                console.print(f"  {entity} {key}: " + ", ".join(
                    f"{k}={_short(v)}" for k, v in row.items()
                    if k not in ("user_id", "item_id")), markup=False)  # "[i1, ...]" is no tag
    finally:
        client.close()
        job = result.get_job_client()
        if job is not None:
            job.cancel().result()
    return user
