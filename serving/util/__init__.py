"""Mechanics every layer may use: SQLite in WAL mode, file locks, atomic writes."""
