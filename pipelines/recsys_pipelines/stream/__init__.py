"""Streaming features: a PyFlink job that keeps the online store fresh.

The job aggregates in Flink SQL (event-time ``HOP`` windows built from
:mod:`recsys_core.features`) and writes Feast's Redis layout from a batched Python sink.
Duplicated event ids are dropped; late rows within the allowed lateness are applied by the
sink; malformed lines go to a dead-letter file and rows later than the lateness to a late file,
both with reasons and counted.

Modules: :mod:`.sql` (the SQL text, pure; Feast's Redis layout: :mod:`recsys_core.online_layout`),
:mod:`.sink` (the batched Redis writer and its Flink UDF), :mod:`.job` (the entrypoint),
:mod:`.status` (checkpoints, counters, dead letters).
"""
