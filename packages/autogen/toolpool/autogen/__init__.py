"""toolpool adapter for autogen (work in progress)."""
