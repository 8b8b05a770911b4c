"""Job records of the training service, in a SQL database through SQLAlchemy (a SQLite file by
default, PostgreSQL for a shared deployment). Ray's job server owns a job's life; a record keeps
who submitted it, its config, and the last status seen, so the service can restart and re-attach."""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from sqlalchemy import Float, Index, Integer, String, Text, create_engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
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
    # which of its tenant's active-job slots (0 .. limit-1) the job holds; None once it has ended.
    # The unique (tenant, slot) index is what keeps several service replicas on one database
    # from admitting more than the limit between them.
    slot: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)

    __table_args__ = (Index("ix_rayft_jobs_tenant_status", "tenant", "status"),
                      Index("ux_rayft_jobs_tenant_slot", "tenant", "slot", unique=True))

    def config_dict(self) -> dict[str, Any]:
        return json.loads(self.config)


class JobStore:
    def __init__(self, url: str):
        try:
            self.engine = create_engine(url, pool_pre_ping=True)
            Base.metadata.create_all(self.engine)
            self._add_slot_column()
        except Exception as exc:  # bad URL, missing driver, server down
            raise RayftError(f"--db {url}: cannot open the job database ({str(exc).splitlines()[0]})") from None
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _add_slot_column(self) -> None:
        """A database written before active-job slots existed gets the column and its index."""
        if "slot" in {c["name"] for c in inspect(self.engine).get_columns(JobRecord.__tablename__)}:
            return
        with self.engine.begin() as connection:
            connection.execute(text(f"ALTER TABLE {JobRecord.__tablename__} ADD COLUMN slot INTEGER"))
            for index in JobRecord.__table__.indexes:
                index.create(connection, checkfirst=True)

    def add(self, record: JobRecord) -> JobRecord:
        with self.sessions.begin() as session:
            session.add(record)
        return record

    def add_active(self, record: JobRecord, limit: int) -> bool:
        """Adds the record in a free one of its tenant's `limit` slots; False when all are taken.
        The database arbitrates: of two writers that pick the same slot, one insert fails."""
        values = {column.name: getattr(record, column.name) for column in JobRecord.__table__.columns}
        for _ in range(limit + 3):
            with self.sessions() as session:
                taken = set(session.scalars(select(JobRecord.slot).where(JobRecord.tenant == record.tenant,
                                                                         JobRecord.slot.is_not(None))))
            free = [slot for slot in range(limit) if slot not in taken]
            if not free:
                return False
            try:
                with self.sessions.begin() as session:
                    session.add(JobRecord(**{**values, "slot": free[0]}))
                return True
            except IntegrityError:
                continue  # another writer took that slot first: look again
        return False

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
            if values.get("status") in FINAL:
                record.slot = None  # an ended job frees its tenant's slot
                if record.ended_at is None:
                    record.ended_at = record.updated_at
            return record

    def close(self) -> None:
        self.engine.dispose()
