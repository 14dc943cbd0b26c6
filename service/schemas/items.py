"""Schemas of the /items resource."""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.schemas.common import Attributes


class ItemPublic(BaseModel):
    id: str
    label: str | None
    attributes: Attributes
    content_hash: str = Field(description="Hash of the original image bytes")
    model_id: str = Field(description="Model that embedded the item")
    created_at: str
    updated_at: str
    uncertainty: float = Field(description="||u||^2 of the item's uncertainty embedding")
    image_url: str = Field(description="Path of the item's original image")


class ItemPage(BaseModel):
    total: int = Field(description="Items in the catalog")
    offset: int
    limit: int
    items: list[ItemPublic]
