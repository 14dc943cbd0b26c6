"""Schemas of POST /search."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import Attributes, FilterValues
from service.validation import MAX_FILTER_KEYS

MAX_K = 100


class SearchOptions(BaseModel):
    """Search parameters: the query string of a multipart request, or body fields of a JSON request.

    Numbers are strict: JSON `true` or `2.0` is not accepted as an integer.
    """

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, le=MAX_K, strict=True, description="Results to return")
    candidates: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Semantic nearest neighbours to rerank; default max(50, k); at least k, "
        "at most the server's IDML_MAX_CANDIDATES",
    )
    min_confidence: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Drop results whose calibrated confidence is below this",
    )
    filter: FilterValues | None = Field(
        None,
        description='Equalities every result must satisfy: attribute name to value, and "label" for the label; '
        f'for example {{"vendor": "google"}}. At most {MAX_FILTER_KEYS} keys; integers within the 64-bit range',
    )


class SearchQueryParams(BaseModel):
    """Query-string form of `SearchOptions`; `filter` is a JSON object in a string.

    The bounds are checked by `SearchOptions` after the fields of a JSON body have replaced
    the query parameters they set, so the schema only documents them here.
    """

    k: int = Field(10, description="Results to return", json_schema_extra={"minimum": 1, "maximum": MAX_K})
    candidates: int | None = Field(
        None, description="Semantic nearest neighbours to rerank; default max(50, k)", json_schema_extra={"minimum": 1}
    )
    min_confidence: float = Field(
        0.0, description="Minimum calibrated confidence", json_schema_extra={"minimum": 0.0, "maximum": 1.0}
    )
    filter: str | None = Field(
        None,
        description="JSON object of attribute equalities, for example {\"vendor\":\"google\"}; "
        f"at most {MAX_FILTER_KEYS} keys",
    )


class SearchJsonRequest(SearchOptions):
    """JSON body of POST /search. Fields set here override the same query-string parameters."""

    image_base64: str = Field(
        min_length=1, description="The query image, base64-encoded; a `data:image/...;base64,` prefix is allowed"
    )


class QueryInfo(BaseModel):
    uncertainty: float = Field(description="||u||^2 of the query's uncertainty embedding")
    ambiguous: bool = Field(description="uncertainty is above ambiguity_threshold")
    ambiguity_threshold: float = Field(description="The model's ambiguity threshold on uncertainty")
    width: int = Field(description="Width in pixels after EXIF orientation")
    height: int = Field(description="Height in pixels after EXIF orientation")
    format: str = Field(description="Image format, for example PNG")
    frames: int = Field(description="Frames in the file; animations are searched by frame 0")


class SearchResult(BaseModel):
    id: str
    label: str | None
    attributes: Attributes
    confidence: float = Field(description="Calibrated probability that the item shows the same thing, 0..1")
    similarity: float = Field(description="Cosine similarity of the semantic embeddings, -1..1")
    distance: float = Field(description="Introspective distance, 0..4; results are ordered by it when reranking")
    semantic_rank: int = Field(description="1-based rank by similarity among the candidates, before reranking")
    image_url: str = Field(description="Path of the item's original image")


class SearchTimings(BaseModel):
    """Milliseconds per stage. `embed` includes the wait for the micro-batch."""

    decode: float
    preprocess: float
    embed: float
    search: float
    rerank: float
    total: float


class SearchResponse(BaseModel):
    model_id: str
    query: QueryInfo
    results: list[SearchResult]
    timings_ms: SearchTimings
