"""What every parameter file's params share: the base model (frozen, unknown keys refused, no NaN
or infinities), the error a file that cannot be used raises, and the device choice."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Device = Literal["auto", "cpu", "cuda"]


class ParamsError(ValueError):
    """A parameter file that cannot be used; the message names every problem."""


class Params(BaseModel):
    """A parameter file or a part of one: frozen, unknown keys refused, no NaN or infinities."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
