"""Query side: decode → localize → embed → category vote → shard search → (re-rank) → response."""
