"""The API's request and answer bodies (pydantic): what FastAPI validates and the OpenAPI document shows."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..planner import DEFAULT_GAP

MAX_TIME_LIMIT_S = 600.0
DEFAULT_DEADLINE_S = 300.0


class SolveBody(BaseModel):
    """POST /v1/solve: what to plan and how. Every field but ``deadline_s`` is part of the cache key."""

    model_config = ConfigDict(extra="forbid")
    graph: dict[str, Any] = Field(
        description="The traced step(s): ckptplan.serve.wire's document "
        '{"format": "ckptplan-graph", "version": 1, "graphs": [...]}'
    )
    budget: Union[int, str] = Field(description='Peak memory: bytes, "8GB", "7.5GiB" or "70%"')
    objective: Literal["time", "flops"] = Field(
        "time", description="time: estimated recompute time; flops: recomputed FLOPs, then time"
    )
    time_limit_s: float = Field(30.0, gt=0, le=MAX_TIME_LIMIT_S, description="The solver's time limit")
    reserve: Optional[float] = Field(None, description="Fraction of the budget kept free (null: the device's default)")
    gap: float = DEFAULT_GAP
    rematerialize: bool = True
    deadline_s: float = Field(
        DEFAULT_DEADLINE_S,
        gt=0,
        le=3600,
        description="Answer 504 if no plan is ready by then (the solve goes on; retry)",
    )


class SweepBody(BaseModel):
    """POST /v1/sweep: the budgets to compare the policies at (``ckptplan sweep``); cached like a solve."""

    model_config = ConfigDict(extra="forbid")
    graph: dict[str, Any] = Field(description="One traced step, as for /v1/solve")
    budgets: list[Union[int, str]] = Field(min_length=1, max_length=32, description='e.g. ["60%", "50%", "40%"]')
    objective: Literal["time", "flops"] = "time"
    time_limit_s: float = Field(30.0, gt=0, le=MAX_TIME_LIMIT_S, description="The solver's time limit, per budget")
    reserve: Optional[float] = None
    rematerialize: bool = True
    deadline_s: float = Field(DEFAULT_DEADLINE_S, gt=0, le=3600)


class SweepAnswer(BaseModel):
    key: str
    cache: Literal["hit", "joined", "solved"]
    rows: list[dict[str, Any]] = Field(description="compare.SweepRow records, ckptplan first at each budget")
    forward_flops: int
    no_checkpointing_peak_bytes: int


class SolveAnswer(BaseModel):
    key: str
    cache: Literal["hit", "joined", "solved"]
    status: str
    plan: str = Field(description="The plan file (YAML), byte for byte as `ckptplan solve` writes it")
    solve_seconds: float


class ErrorAnswer(BaseModel):
    error: str
    message: str
    minimum_bytes: Optional[int] = None
    minimum_proven: Optional[bool] = None
    minimum_source: Optional[str] = None
    minimum_lower_bytes: Optional[int] = None
