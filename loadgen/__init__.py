"""The load generator: `specrelay loadgen run|report|capacity|sweep` (see README.md beside this file)."""
