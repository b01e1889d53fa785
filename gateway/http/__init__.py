"""The gateway's OpenAI-compatible HTTP front: /v1/models, /v1/completions, /v1/chat/completions over
the same keys, queue and replicas as gRPC (gateway.generation)."""
