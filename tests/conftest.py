"""Shared fixtures: a trained model repository and a real server process on 127.0.0.1:0.

NOTE: this file imports neither `protos` nor `tritonclient`: both register the protobuf
package `inference`, so tests/clients (tritonclient) runs in a pytest process of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess, start_server


@pytest.fixture(scope="session")
def digits_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding one freshly trained `digits` version."""
    from trainer.digits import train_digits

    repository = tmp_path_factory.mktemp("model_repository")
    train_digits(repository, progress=False)
    return repository


@pytest.fixture(scope="module")
def server_process(
    digits_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A real server on 127.0.0.1 serving the digits repository, stopped in teardown."""
    server = start_server(digits_repository, tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield server
    finally:
        server.terminate()
