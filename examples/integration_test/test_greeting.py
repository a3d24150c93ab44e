"""Integration tests of GreetingClient against a real greeting server.

pytest examples/integration_test
"""

import pytest
from greeting_client import GreetingClient
from greeting_server import serve

# Fail any test here that leaves a background task running (--bgtask-leaks does it for a run).
pytestmark = pytest.mark.bgtask_leaks


def test_greets_by_name(base_url: str) -> None:
    assert GreetingClient(base_url).greet("Ada") == "hello Ada"


def test_names_are_quoted(base_url: str) -> None:
    assert GreetingClient(base_url).greet("Grace Hopper & co") == "hello Grace Hopper & co"


def test_a_server_of_its_own(bgtask_service) -> None:
    """A test that needs a fresh server starts one for itself; it is stopped at teardown."""
    port = bgtask_service(serve)
    assert GreetingClient(f"http://127.0.0.1:{port}").greet("again") == "hello again"
