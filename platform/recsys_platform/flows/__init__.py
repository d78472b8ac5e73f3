"""Every Prefect flow of the platform, wiring only (plain functions live in the stages).

- :mod:`.data`: daily ETL, batch features, (incremental) materialization, ``prefect_api``.
- :mod:`.platform_flow`: ETL -> features -> training snapshot -> train -> gate -> promote.
- :mod:`.monitoring`: the hourly drift / served-log / serving-rate checks.
- :mod:`.experiment`: the scheduled decision of a running experiment.

Deployments: ``prefect.yaml`` at the repository root.
"""
