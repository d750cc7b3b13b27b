"""What leaves the server: Label Studio result items (regions, RLE, HyperText ranges), the config schema, validation."""
