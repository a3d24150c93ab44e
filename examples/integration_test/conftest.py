"""The service runs once for the whole session, in a background process of its own.

``bgtask_session_service`` (from bgtask's pytest plugin) starts ``serve()``, waits until it
called ``bgtask.ready(port)`` and returns the port; the server is stopped after the last test,
also when the run fails or is interrupted.
"""

import pytest
from greeting_server import serve


@pytest.fixture(scope="session")
def base_url(bgtask_session_service) -> str:
    port = bgtask_session_service(serve, "127.0.0.1")
    return f"http://127.0.0.1:{port}"
