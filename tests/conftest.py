"""pytest fixtures; the shared models, inputs and config cases are in `testing_common`."""

from __future__ import annotations

import pytest
from testing_common import MODELS


@pytest.fixture(params=list(MODELS))
def model_name(request) -> str:
    return request.param
