"""Students: the one-step student D, its 1-bit copy B, the binarizers and the packed B file. Imports core and
teacher (docs/modules.md)."""
