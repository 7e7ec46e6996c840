"""Test-wide environment: nothing reaches a hub, wandb stays offline, threads stay few.

`user_env` gives the environment without what this file adds, for tests that run a command
exactly as a user does (README's main job). `--seed-sweep` runs the tests marked `seed_sweep`
(the demo over five seeds, about 20 minutes on 2 cores), which are skipped otherwise.
"""

import os

import pytest

_TEST_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}
_ADDED = [k for k in _TEST_DEFAULTS if k not in os.environ]
# Set before any test imports transformers / vllm / wandb.
for _key, _value in _TEST_DEFAULTS.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _ADDED}


def pytest_addoption(parser):
    parser.addoption("--seed-sweep", action="store_true", help="run the tests marked seed_sweep")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--seed-sweep"):
        return
    skip = pytest.mark.skip(reason="the demo's seed sweep (~20 min on 2 cores): run with --seed-sweep")
    for item in items:
        if "seed_sweep" in item.keywords:
            item.add_marker(skip)
