"""Scaling out: big /predict requests split across replicas."""
