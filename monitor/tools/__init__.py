"""Developer and operator tools that are not part of the serving path (fuzzing, soak)."""
