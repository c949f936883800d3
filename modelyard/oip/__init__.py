"""Open Inference Protocol v2 stubs, generated from protos/inference. Do not edit."""
