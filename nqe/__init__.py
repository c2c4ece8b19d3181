"""NQE: a mixed-precision quantized encoder, from one network spec to bit-exact silicon."""

__version__ = "0.1.0"
