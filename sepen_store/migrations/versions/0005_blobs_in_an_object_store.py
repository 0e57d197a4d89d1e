"""Blobs in an object store: blobs.object_key (the key of the blob's bytes in the S3 bucket of SEPEN_BLOB_BACKEND=s3,
unique), blobs.data nullable (empty for such a blob), blobs.size a 64-bit integer (a checkpoint may pass 2 GiB).

Existing blobs keep their bytes in their rows and stay readable with either backend. On Postgres the new type of
`size` rewrites the table: on a database already holding gigabytes of blobs, expect the migration to take a while.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("object_key", sa.String(512), nullable=True))
        batch.alter_column("size", existing_type=sa.Integer, type_=sa.BigInteger, existing_nullable=False)
        batch.alter_column("data", existing_type=sa.LargeBinary, nullable=True)
        batch.create_unique_constraint("uq_blobs_object_key", ["object_key"])


def downgrade() -> None:
    stored = op.get_bind().scalar(sa.text("SELECT count(*) FROM blobs WHERE object_key IS NOT NULL"))
    if stored:
        raise RuntimeError(
            f"{stored} blob(s) keep their bytes in the object store, which this schema cannot refer to: "
            "delete them (or copy their bytes into blobs.data) before downgrading"
        )
    with op.batch_alter_table("blobs") as batch:
        batch.drop_constraint("uq_blobs_object_key", type_="unique")
        batch.alter_column("data", existing_type=sa.LargeBinary, nullable=False)
        batch.alter_column("size", existing_type=sa.BigInteger, type_=sa.Integer, existing_nullable=False)
        batch.drop_column("object_key")
