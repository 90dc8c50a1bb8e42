"""How a model runs: the settings the engine reads."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    """A model: a spec (see optimize.llm.models) and how llama.cpp runs it. The `[model]` table of an
    experiment file maps onto it; it lives here because the engine is what reads it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = "smollm2-135m"
    n_ctx: int = Field(4096, ge=256, le=131072)
    n_threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(256, ge=1)
    seed: int = 0
    cache: bool = Field(True, description="DSPy's response cache, keyed on the model file's sha256")
    engine: Literal["batched", "sequential"] = Field("batched", description="batched: many sequences decoded together (optimize.llm.batched); sequential: one call at a time")
    parallel: int = Field(16, ge=1, le=64, description="sequences decoded together by the batched engine")
    stream_cells: int = Field(1024, ge=256, multiple_of=256, description="KV cells each batched sequence holds "
                              "(at most n_ctx); a longer call runs alone, on an n_ctx context made when the first one comes")
    kv_cache_mb: int = Field(1200, ge=1, description="KV cache memory the batched engine may take; it runs fewer "
                             "than `parallel` sequences when they do not fit (each holds stream_cells cells)")
    overflow: Literal["fail", "truncate"] = Field("fail", description="what to do with a prompt longer than n_ctx")
