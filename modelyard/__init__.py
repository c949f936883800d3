"""Modelyard's shared kernel: contracts' stubs, tensor codec, settings, errors, Redis access,
gRPC plumbing and the CLI. Services import only this package and their own.

Kept free of heavy imports: the gateway and the CLI never load torch.
"""

from __future__ import annotations

from modelyard.errors import ModelyardError

__all__ = ["__version__", "ModelyardError"]

__version__ = "0.1.0"
