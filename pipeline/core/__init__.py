"""Core: configuration, errors, atomic files, processes; what every other part uses and imports nothing of the
package (docs/modules.md)."""
