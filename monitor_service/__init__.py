"""The monitor: watches the cluster through Redis membership and reports its health."""
