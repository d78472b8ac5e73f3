"""Data pipelines: generator and importers, ETL, batch and stream features, Prefect flows."""
