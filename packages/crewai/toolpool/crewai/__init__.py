"""toolpool adapter for crewai (work in progress)."""
