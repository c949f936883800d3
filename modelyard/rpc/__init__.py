"""gRPC plumbing shared by every service: error mapping, server factory, interceptors, channels."""
