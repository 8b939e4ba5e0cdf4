"""Identity: enrollments, their embeddings (vectors encrypted), the identity audit log.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identity_enrollments",
        sa.Column("enrollment_id", sa.String(36), primary_key=True),
        sa.Column("candidate_id", sa.String(128), nullable=False, unique=True),
        sa.Column("exam_id", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replaced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_session_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("template", sa.LargeBinary, nullable=True),
    )
    op.create_table(
        "identity_embeddings",
        sa.Column("embedding_id", sa.String(36), primary_key=True),
        sa.Column(
            "enrollment_id",
            sa.String(36),
            sa.ForeignKey("identity_enrollments.enrollment_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("candidate_id", sa.String(128), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("quality_score", sa.Float, nullable=False),
        sa.Column("face_bbox", sa.JSON, nullable=False),
        sa.Column("pose_angles", sa.JSON, nullable=False),
        sa.Column("sharpness_score", sa.Float, nullable=False),
        sa.Column("selected", sa.Boolean, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_identity_embeddings_enrollment_id", "identity_embeddings", ["enrollment_id"])
    op.create_index("ix_identity_embeddings_candidate_id", "identity_embeddings", ["candidate_id"])
    op.create_table(
        "identity_audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("candidate_id", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("result", sa.JSON, nullable=False),
    )
    op.create_index("ix_identity_audit_at", "identity_audit", ["at"])
    op.create_index("ix_identity_audit_candidate_id", "identity_audit", ["candidate_id"])


def downgrade() -> None:
    op.drop_table("identity_audit")
    op.drop_table("identity_embeddings")
    op.drop_table("identity_enrollments")
