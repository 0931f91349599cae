"""The bottom layer: atomic file writes, checksums and progress callbacks, shared by every other layer."""
