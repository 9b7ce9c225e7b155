"""Many virtual hospitals on one machine, through Flower's simulation engine."""
