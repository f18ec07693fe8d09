"""Train: the shared training loop, its losses and terms, and the training stages. Imports core, teacher, data
and students (docs/modules.md)."""
