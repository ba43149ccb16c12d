"""zomem: what memory-efficient fine-tuning optimizers really cost, measured."""

__version__ = "0.1.0"
