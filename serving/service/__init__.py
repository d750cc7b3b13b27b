"""The model API Label Studio talks to (setup, predict, fit, versions) and the configs it has seen."""
