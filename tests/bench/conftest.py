"""The engine tests' plan fixtures, for the model benchmark's tests."""

from tests.engine.conftest import plan_factory, stand_in_plan  # noqa: F401 - pytest fixtures
