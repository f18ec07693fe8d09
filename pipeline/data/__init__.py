"""Data: the dataset images and the offline teacher data (codecs, shards, manifest) and the stages that write
and check them. Imports core and teacher (docs/modules.md)."""
