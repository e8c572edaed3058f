"""calibration stage of mpismoe-edge."""
