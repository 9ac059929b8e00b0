"""pytest-benchmark suite for optimizer steps (run explicitly: ``pytest benches``)."""
