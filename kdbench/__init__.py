"""kdbench: a benchmark of knowledge-distillation methods on CIFAR-style teacher/student pairs."""

__version__ = "0.1.0"
