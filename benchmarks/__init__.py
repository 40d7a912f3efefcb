"""The benchmark harness behind `fhe-backend bench` (installed as `fhe_backend.benchmarks`)."""
