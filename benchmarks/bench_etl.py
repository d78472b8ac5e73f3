"""ETL, batch features and materialization on 1M generated events (real Prefect, Ray, Feast,
Redis). Floor: writing the very rows Feast materializes with a raw redis-py pipeline.

Uses Redis database 1 under a project name unique to the run and deletes its keys at the end.
Prints events/s for the ETL flow, rows/s for the features and for materialization, and the
ratio materialization time / raw pipelined write time.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import redis
import yaml

from recsys_core import features as F
from recsys_core.settings import load_settings
from recsys_pipelines import batch_features, feature_store
from recsys_pipelines.generator import GeneratorConfig, generate, write_generated
from recsys_platform.flows.data import etl_flow
from recsys_platform.runtime import ensure_ray

REDIS_URL = "redis://127.0.0.1:6379/1"
REPO = Path(__file__).resolve().parents[1] / "feature_repo"


def _latest_rows(settings: object, t: pd.Timestamp) -> dict[str, pd.DataFrame]:
    """The rows materializing up to ``t`` writes: the latest per entity and view."""
    out = {}
    for view in F.BATCH_VIEWS:
        key = F.USER_KEY if view.startswith("user") else F.ITEM_KEY
        frame = pads.dataset(str(feature_store.offline_dir(settings) / view)).to_table(
            filter=pads.field(F.WINDOW_END) == t).to_pandas()  # type: ignore[arg-type]
        out[view] = frame.drop_duplicates(key, keep="last")
    return out


def _raw_pipeline_write(client: redis.Redis, rows: dict[str, pd.DataFrame], prefix: str) -> int:
    """One hash per entity, one field per feature, pipelined in chunks of 1,000 commands."""
    written = 0
    pipe = client.pipeline(transaction=False)
    for view, frame in rows.items():
        key = F.USER_KEY if view.startswith("user") else F.ITEM_KEY
        features = [c for c in frame.columns if c not in (key, F.WINDOW_END)]
        for record in frame.to_dict("records"):
            mapping = {f: str(record[f]) for f in features}
            mapping["_ts"] = str(record[F.WINDOW_END].value)
            pipe.hset(f"{prefix}:{view}:{record[key]}", mapping=mapping)
            written += 1
            if written % 1_000 == 0:
                pipe.execute()
    pipe.execute()
    return written


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    cfg = GeneratorConfig(events=1_000_000, users=20_000, items=50_000, dirt_rate=0.01)
    project = f"bench_{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS_URL)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generated = write_generated(generate(cfg), root / "data" / "landing")
        repo = root / "feature_repo"
        repo.mkdir()
        (repo / "definitions.py").write_text((REPO / "definitions.py").read_text())
        config = root / "settings.yaml"
        config.write_text(yaml.safe_dump({
            "data_dir": str(root / "data"), "redis": {"url": REDIS_URL},
            "feast": {"project": project, "repo_path": str(repo), "online_store": "redis"}}))
        settings = load_settings("local", config)
        start, end = cfg.start, cfg.start + timedelta(days=cfg.days - 1)
        try:
            etl_flow(start=end, end=end, settings=settings, landing_dir=str(root / "nothing"))
            t0 = time.perf_counter()
            etl = etl_flow(start=start, end=end, settings=settings)
            t_etl = time.perf_counter() - t0

            ensure_ray(settings)
            t0 = time.perf_counter()
            tables = batch_features.compute_features(settings.lake_dir, start, end)
            batch_features.write_feature_tables(tables, feature_store.offline_dir(settings))
            t_feat = time.perf_counter() - t0
            feature_rows = sum(tables.rows.values())

            feature_store.apply_definitions(settings)
            t_end = batch_features.day_end(end)
            window = (t_end - pd.Timedelta(days=1)).to_pydatetime(), t_end.to_pydatetime()
            t0 = time.perf_counter()
            feature_store.materialize(settings, *window)
            t_mat = time.perf_counter() - t0
            rows = _latest_rows(settings, t_end)
            n_rows = sum(len(f) for f in rows.values())

            prefix = f"{project}:raw"
            t0 = time.perf_counter()
            written = _raw_pipeline_write(client, rows, prefix)
            t_raw = time.perf_counter() - t0
        finally:
            for pattern in (f"*{project}", f"{project}:raw:*"):
                keys = list(client.scan_iter(match=pattern, count=5_000))
                for i in range(0, len(keys), 5_000):
                    client.delete(*keys[i:i + 5_000])
            client.close()
    n = etl["input_rows"]
    print(f"etl flow: {n:,} raw events ({generated.events:,} generated) in {t_etl:.1f}s "
          f"({n / t_etl:,.0f} events/s); {etl['clean_rows']:,} clean, "
          f"{etl['quarantined_rows']:,} quarantined")
    print(f"batch features (Ray Data, 14 day ends): {feature_rows:,} rows in {t_feat:.1f}s "
          f"({feature_rows / t_feat:,.0f} rows/s)")
    print(f"materialize (Feast -> Redis): {n_rows:,} entity rows in {t_mat:.1f}s "
          f"({n_rows / t_mat:,.0f} rows/s)")
    print(f"raw redis-py pipelined HSET of the same {written:,} rows (floor): {t_raw:.1f}s "
          f"({written / t_raw:,.0f} rows/s); materialize/raw ratio {t_mat / t_raw:.1f}")


if __name__ == "__main__":
    main()
