"""jobs.manifest_file: manifest.json's own listing entry (size, sha256), hashed once when a job succeeds.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("manifest_file", _JSON))


def downgrade() -> None:
    op.drop_column("jobs", "manifest_file")
