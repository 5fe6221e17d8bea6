"""Jobs, job events and calibration uploads.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(16)),
        sa.Column("progress_done", sa.Integer),
        sa.Column("progress_total", sa.Integer),
        sa.Column("phase_started_at", _WHEN),
        sa.Column("request", _JSON, nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(255), unique=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("worker_host", sa.String(255)),
        sa.Column("worker_pid", sa.Integer),
        sa.Column("lease_expires_at", _WHEN),
        sa.Column("heartbeat_at", _WHEN),
        sa.Column("error_code", sa.String(32)),
        sa.Column("error_message", sa.Text),
        sa.Column("model_revision", sa.String(128)),
        sa.Column("artifact_dir", sa.String(255)),
        sa.Column("manifest", _JSON),
        sa.Column("created_at", _WHEN, nullable=False),
        sa.Column("started_at", _WHEN),
        sa.Column("finished_at", _WHEN),
        sa.Column("updated_at", _WHEN, nullable=False),
    )
    op.create_index("ix_jobs_status_id", "jobs", ["status", "id"])
    op.create_table(
        "job_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("created_at", _WHEN, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(16)),
        sa.Column("done", sa.Integer),
        sa.Column("total", sa.Integer),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", _JSON, nullable=False),
        sa.UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),
    )
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", _WHEN, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("uploads")
    op.drop_table("job_events")
    op.drop_index("ix_jobs_status_id", table_name="jobs")
    op.drop_table("jobs")
