"""Shared test settings: hypothesis profiles (no deadline: CI machines are slow and shared).

``HYPOTHESIS_PROFILE=ci`` (the default) keeps example counts moderate; ``dev`` is quicker still and
``thorough`` runs many more examples. Tests that set ``max_examples`` themselves keep their value.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
