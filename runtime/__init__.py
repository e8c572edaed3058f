"""runtime stage of mpismoe-edge."""
