"""The API tests use the service tests' fixtures (fake engine, clients, servers, photos)."""

from tests.service.conftest import client, fake_engine, photos, thread_server  # noqa: F401
