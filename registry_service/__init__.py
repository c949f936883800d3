"""The registry service: the source of truth for models, versions, artifacts and aliases.

SQLite holds the metadata and a content-addressed directory the artifacts; Redis gets a live
copy of every model's aliases, rebuilt from SQLite on start and whenever it drifts.

Modules: `settings` (configuration), `records` (the core's value types), `db` (the SQLite file
and the thread that runs every transaction), `store_models` / `store_aliases` /
`store_deployments` / `store_audit` (persistence by resource), `artifacts` (the artifact
directory), `formats` (the upload-time inspection of an archive), `registry` (the core, no
gRPC) with `rules` (its decisions inside a transaction) and `deployments` (pure deployment
rules), `convert` (records <-> protobuf), `servicer` (the thin gRPC adapter) and `app` (the
composition root).
"""
