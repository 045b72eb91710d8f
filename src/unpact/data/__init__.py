"""Benchmarks: the item format, built-in fictional sets, readers for real ones."""

from unpact.data.items import BUILTIN, Benchmark, Document, QAItem, load_folder
from unpact.data.sources import general_items, load_benchmark, materialise

__all__ = [
    "BUILTIN",
    "Benchmark",
    "Document",
    "QAItem",
    "general_items",
    "load_benchmark",
    "load_folder",
    "materialise",
]
