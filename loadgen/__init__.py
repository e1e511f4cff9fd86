"""The load generator: `specrelay loadgen run|report|sweep` (see README.md beside this file)."""
