"""Times the synthetic generator on 1M events against writing the same rows to Parquet."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from recsys_pipelines.generator import GeneratorConfig, generate, write_generated


def main() -> None:
    cfg = GeneratorConfig(events=1_000_000, users=20_000, items=50_000, dirt_rate=0.01)
    t0 = time.perf_counter()
    data = generate(cfg)
    t_gen = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        write_generated(data, Path(tmp))
        t_write = time.perf_counter() - t1
    n = len(data.events)
    print(f"generate: {n:,} events in {t_gen:.2f}s ({n / t_gen:,.0f} events/s)")
    print(f"write parquet (floor): {t_write:.2f}s; generate/write ratio {t_gen / t_write:.2f}")


if __name__ == "__main__":
    main()
