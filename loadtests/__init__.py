"""Load tests and benchmarks: perf_analyzer runs now; Locust and open-loop generator later."""
