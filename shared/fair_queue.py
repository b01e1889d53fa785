"""Moved: the generation queue is part of shared.request_protocol. Kept only for modules that still
import these two names from here (serving_service.engine, gateway.servicer)."""

from shared.request_protocol import cost_tokens  # noqa: F401
from shared.tenancy import DEFAULT_TENANT  # noqa: F401
