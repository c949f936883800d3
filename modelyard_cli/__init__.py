"""The operator's tools, above the services: the `modelyard` command line (`app`), the local
cluster `modelyard up` supervises (`local_cluster`, with `embedded_redis` and `processes`) and
the demo model (`demo`).

Nothing in the kernel (`modelyard`) or in a service imports this package; the load tests and
the benches use the local cluster and the demo, and the command line mounts the load tests'
own commands (`modelyard load`).
"""
