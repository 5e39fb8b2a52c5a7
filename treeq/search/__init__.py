"""TreeQ mixed-precision search: tree-structured search (TSS) with environmental noise guidance, and its baselines."""
