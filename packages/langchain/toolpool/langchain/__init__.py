"""toolpool adapter for langchain (work in progress)."""
