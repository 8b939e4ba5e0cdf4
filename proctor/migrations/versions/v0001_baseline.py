"""Baseline: the schema of the releases before migrations (see livekit_proctor.migrations.baseline).

On an empty database it creates that schema; on one an older release made (tables, no alembic_version) it
adds what is missing and keeps every row, and Alembic stamps it 0001.

Revision ID: 0001
"""

from __future__ import annotations

from alembic import op

from livekit_proctor.migrations.baseline import adopt

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    adopt(op.get_bind())


def downgrade() -> None:
    raise NotImplementedError("the baseline is not downgraded")
