"""edge-wbc: leukocyte differential at the microscope (device runtime, TensorFlow-free)."""

__version__ = "0.1.0"
