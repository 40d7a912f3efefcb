"""Calibration, quantizers and the integer program of an FHE partition."""
