"""The model server: follows the aliases in Redis, loads the versions they point at from the
registry, and serves `modelyard.v1.ModelServerService` with dynamic batching."""
