import socket

import pytest


@pytest.fixture(scope="session")
def model():
    """(model, tokenizer, path) of the default SmolLM2, loaded once for the whole session."""
    from helpers.embedded.model import load_model

    return load_model()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, monkeypatch_session):
    """Pid files and logs of engines started by tests, away from a user's .engines/."""
    from helpers import runtime

    d = tmp_path_factory.mktemp("engines")
    monkeypatch_session.setattr(runtime, "RUN_DIR", d)
    monkeypatch_session.setenv("KVBLEND_RUN_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def live_engines(run_dir):
    """Both embedded engines on free ports, started through helpers.engines, stopped at the end."""
    from helpers import engines

    started = engines.start("embedded", blend_port=free_port(), full_port=free_port(), timeout=240,
                            progress=False, kv_dir=None)  # every run starts cold
    yield {e.name: e for e in started}
    engines.stop()


# What each test needs, as markers (`make check` runs the tests that need none of them): a fixture
# that loads the model or starts engines marks every test that uses it; modules mark themselves.
NEEDS = {"model": "model", "live_engines": "engines", "engine_ports": "notebook"}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marker in NEEDS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
