"""fedagg + Flower: a robust Flower App in NumPy (see ../README.md)."""
