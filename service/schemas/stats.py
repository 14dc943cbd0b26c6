"""Schemas of GET /stats and the health routes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ThreadSettings(BaseModel):
    workers: int = Field(description="uvicorn worker processes")
    onnxruntime_intra_op: int = Field(description="onnxruntime intra-op threads per worker")
    faiss_omp: int = Field(description="FAISS OpenMP threads per search (concurrent requests search in parallel)")
    decode: int = Field(description="Threads per worker decoding and preprocessing uploads")
    batch_window_ms: float
    max_batch: int


class WorkerInfo(BaseModel):
    pid: int = Field(description="Process id of the worker that served this request")
    role: str = Field(
        description='"writer": this worker writes the catalog; "follower": another worker does, and this one '
        "applies its commits before each read and forwards writes to it"
    )


class StatsResponse(BaseModel):
    count: int = Field(description="Items in the catalog")
    model_id: str
    index_type: str | None = Field(description="FAISS index kind in use: flat, hnsw, ivf_sq8 or ivf_pq")
    formats: list[str] = Field(description="Image formats accepted; HEIF and AVIF appear when a decoder for them is installed")
    threads: ThreadSettings
    worker: WorkerInfo
    catalog: dict[str, Any] = Field(description="The catalog's own statistics: counts, index parameters, sizes on disk")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model_id: str | None = None
    count: int | None = None
