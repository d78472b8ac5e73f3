"""Data pipelines: generator and importers, ETL, batch and stream features.

Their Prefect flows live in :mod:`recsys_platform.flows`.
"""
