"""Evaluation: metrics, reports, samples and the Python API. Imports core, teacher, data and students
(docs/modules.md)."""
