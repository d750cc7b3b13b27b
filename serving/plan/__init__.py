"""Labeling config -> Plan: which model family fills which control tag; the plan's model_version."""
