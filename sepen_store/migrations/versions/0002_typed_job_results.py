"""Job results in the typed contract's shape: indices instead of the URLs the worker used to store.

Generate results: each image's `url` and `heatmap_url` go; `heatmap` says whether a heatmap was stored.
Finetune results: `weights_url` goes. The gateway makes every URL (sepen_store/contract.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("kind", sa.String), sa.column("result", sa.JSON))


def typed(kind: str, result: dict) -> dict:
    if not isinstance(result, dict):
        return result
    if kind == "finetune":
        return {k: v for k, v in result.items() if k != "weights_url"}
    images = [
        {
            **{k: v for k, v in image.items() if k not in ("url", "heatmap_url")},
            "heatmap": bool(image.get("heatmap_url")),
        }
        for image in result.get("images") or []
        if isinstance(image, dict)
    ]
    return {**result, "images": images}


def untyped(kind: str, job_id: str, result: dict) -> dict:
    if not isinstance(result, dict):
        return result
    if kind == "finetune":
        if "name" not in result or "version" not in result:
            return result
        return {**result, "weights_url": f"/adapters/{result['name']}/{result['version']}/weights"}
    images = []
    for position, image in enumerate(result.get("images") or []):
        old = {k: v for k, v in image.items() if k != "heatmap"}
        old["url"] = f"/jobs/{job_id}/images/{image.get('index', position)}"
        if image.get("heatmap"):
            old["heatmap_url"] = f"/jobs/{job_id}/heatmaps/{image.get('index', position)}"
        images.append(old)
    return {**result, "images": images}


def _rewrite(change) -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.kind, jobs.c.result).where(jobs.c.result.is_not(None)))
    for job_id, kind, result in rows.all():
        new = change(job_id, kind, result)
        if new != result:
            connection.execute(jobs.update().where(jobs.c.id == job_id).values(result=new))


def upgrade() -> None:
    _rewrite(lambda job_id, kind, result: typed(kind, result))


def downgrade() -> None:
    _rewrite(lambda job_id, kind, result: untyped(kind, job_id, result))
