"""The experiment manifests and plans (experiments/), shipped in the wheel as `codistill.manifests` (pyproject.toml)."""
