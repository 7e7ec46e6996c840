"""Test-wide environment: nothing reaches a hub, wandb stays offline, threads stay few.

`user_env` gives the environment without what this file adds, for tests that run a command
exactly as a user does (README's main job). `--seed-sweep` runs the tests marked `seed_sweep`
(the demo over five seeds, about 20 minutes on 2 cores) and `--by-hand` the tests marked
`by_hand` (rehearsals of recipes CI does not run: the 3B, about 5 minutes); both are skipped
otherwise.
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


_OPT_IN = {
    "seed_sweep": ("--seed-sweep", "the demo's seed sweep (~20 min on 2 cores)"),
    "by_hand": ("--by-hand", "run once by hand, not in CI's budget"),
}


def pytest_addoption(parser):
    for marker, (option, what) in _OPT_IN.items():
        parser.addoption(option, action="store_true", help=f"run the tests marked {marker}: {what}")


def pytest_collection_modifyitems(config, items):
    for marker, (option, what) in _OPT_IN.items():
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"{what}: run with {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
