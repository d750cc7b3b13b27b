"""Batch prediction jobs: the store, inputs, the runner, the manager, pushing to Label Studio, engines (local, Ray)."""
