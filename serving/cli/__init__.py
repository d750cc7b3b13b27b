"""The command line (`python -m serving ...`): main.py parses; one module per command."""
