"""Item features for quality re-ranking (the feature-store issue). Today: the feature-event log."""
