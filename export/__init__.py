"""export stage of mpismoe-edge."""
