"""The bottom layer: errors, progress reporting, devices, metrics and calibration (no xferkit imports)."""
