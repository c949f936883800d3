"""The gateway: the cluster's public entry point. Routes every Predict call by the version
pointers in Redis to a model server that holds the version, without re-encoding tensors."""
