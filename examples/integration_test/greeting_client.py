"""The library under test: a client of the greeting service."""

import json
import urllib.parse
import urllib.request


class GreetingClient:
    """Asks a greeting service to greet someone."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def greet(self, name: str) -> str:
        url = f"{self.base_url}/greet?name={urllib.parse.quote(name)}"
        with urllib.request.urlopen(url, timeout=self.timeout) as response:
            return str(json.load(response)["greeting"])
