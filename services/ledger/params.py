"""Bounds of every path and query parameter of the ledger's HTTP API: a value outside them is
answered 422 before any SQL runs, and the OpenAPI document states them."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

CAMPAIGN_NAME = r"^[A-Za-z0-9_-]+$"  # as `nightshift campaign start` accepts (NATS keys)
VARIANT_ID = r"^[0-9a-f]{16}$"  # services.contracts.variant_id_for
RUN_ID = r"^[0-9a-f]{16}-[A-Za-z0-9_.-]+-[0-9]+$"  # services.contracts.run_id_for
MAX_NAME_LENGTH = 128
MAX_RUN_ID_LENGTH = 160
MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000_000  # far below SQLite's 64-bit integers

CampaignName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=CAMPAIGN_NAME,
        description="campaign name: letters, digits, '-' or '_'",
        examples=["default"],
    ),
]
VariantId = Annotated[
    str,
    Path(
        min_length=16,
        max_length=16,
        pattern=VARIANT_ID,
        description="variant id: 16 lowercase hex digits",
    ),
]
RunId = Annotated[
    str,
    Path(
        min_length=20,
        max_length=MAX_RUN_ID_LENGTH,
        pattern=RUN_ID,
        description="run id: `<variant_id>-<tier>-<replica>`",
    ),
]
MAX_PAGE = MAX_OFFSET  # a page number far below SQLite's 64-bit integers
