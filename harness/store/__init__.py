"""The store: what a result row is and where a run's rows live.

- `schema`: the row schema, every column name as a constant with its unit, the row kinds, `split`
  by kind and the identity of a configuration (`config_key`, `quality_key`) that every reader uses.
- `files`: atomic writes, file modes, locks, JSON text; the store's errors.
- `writer`: `RunStore` (journal, fold into results.parquet, run.json, the run's lock), run ids.
- `reader`: `read_run` -> `StoredRun`, `load`, `latest_run`: how every command opens a run.

Layout of a run folder: see `harness.store.files`.
"""
