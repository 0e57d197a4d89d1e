"""Compute quotas: jobs.compute_s (seconds a job's attempts ran) and the indexes the per-tenant quotas read.

Jobs finished before this revision get the time of their last attempt (finished_at - started_at), the best
the old rows tell; a running job starts counting at its next heartbeat.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("compute_s", sa.Float, nullable=False, server_default="0"))
    if op.get_bind().dialect.name == "postgresql":
        ran = "GREATEST(0, EXTRACT(EPOCH FROM (finished_at - started_at)))"
    else:
        ran = "max(0, (julianday(finished_at) - julianday(started_at)) * 86400.0)"
    op.execute(f"UPDATE jobs SET compute_s = {ran} WHERE finished_at IS NOT NULL AND started_at IS NOT NULL")
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant", "status"])
    op.create_index("ix_jobs_tenant_finished", "jobs", ["tenant", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_finished", table_name="jobs")
    op.drop_index("ix_jobs_tenant_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("compute_s")
