"""Shared fixtures: options, markers and the real-Redis factory used by the integration tiers."""
