"""Job records of the training service, in a SQL database through SQLAlchemy (a SQLite file by
default, PostgreSQL for a shared deployment). Ray's job server owns a job's life; a record keeps
who submitted it, its config, and the last status seen, so the service can restart and re-attach."""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from sqlalchemy import Float, Index, String, Text, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from rayft.errors import RayftError

ACTIVE = ("PENDING", "RUNNING")
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class Base(DeclarativeBase):
    pass


class JobRecord(Base):
    __tablename__ = "rayft_jobs"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(10))  # train | sweep
    name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")
    config: Mapped[str] = mapped_column(Text)  # the resolved config, JSON
    output_dir: Mapped[str] = mapped_column(Text)
    mlflow_uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[Optional[float]] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_rayft_jobs_tenant_status", "tenant", "status"),)

    def config_dict(self) -> dict[str, Any]:
        return json.loads(self.config)


class JobStore:
    def __init__(self, url: str):
        try:
            self.engine = create_engine(url, pool_pre_ping=True)
            Base.metadata.create_all(self.engine)
        except Exception as exc:  # bad URL, missing driver, server down
            raise RayftError(f"--db {url}: cannot open the job database ({str(exc).splitlines()[0]})") from None
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def add(self, record: JobRecord) -> JobRecord:
        with self.sessions.begin() as session:
            session.add(record)
        return record

    def get(self, job_id: str) -> Optional[JobRecord]:
        with self.sessions() as session:
            return session.get(JobRecord, job_id)

    def list(self, tenant: Optional[str] = None, active_only: bool = False) -> list[JobRecord]:
        query = select(JobRecord).order_by(JobRecord.created_at)
        if tenant is not None:
            query = query.where(JobRecord.tenant == tenant)
        if active_only:
            query = query.where(JobRecord.status.in_(ACTIVE))
        with self.sessions() as session:
            return list(session.scalars(query))

    def count_active(self, tenant: str) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(JobRecord)
                                  .where(JobRecord.tenant == tenant, JobRecord.status.in_(ACTIVE)))

    def update(self, job_id: str, **values: Any) -> JobRecord:
        with self.sessions.begin() as session:
            record = session.get(JobRecord, job_id)
            for key, value in values.items():
                setattr(record, key, value)
            record.updated_at = time.time()
            if values.get("status") in FINAL and record.ended_at is None:
                record.ended_at = record.updated_at
            return record

    def close(self) -> None:
        self.engine.dispose()
