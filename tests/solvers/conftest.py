"""Fixtures for the solver tests; problems live in ``solver_problems.py``."""

import pytest

from solver_problems import FORWARD, LINEAR


@pytest.fixture(params=FORWARD)
def forward_name(request) -> str:
    return request.param


@pytest.fixture(params=LINEAR)
def linear_name(request) -> str:
    return request.param
