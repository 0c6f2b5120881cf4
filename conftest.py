# Development-only: the lead moves these profiles into test_kimik2.py when the test files are merged.
import os
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=10, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
