"""Running models: the runtime (model slots, background loads), preparation, micro-batching, devices, metrics."""
