"""Ray entry points (Hydra mains). The work itself lives in `lineage`."""
