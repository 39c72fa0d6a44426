"""distributed_distill: distill large language models into small ones, from one CPU to a cluster."""

__version__ = "0.1.0"
