"""The recipe's ``calibration:`` field, a plain schema kept here, beside the code that reads it, so
that the calibration package needs nothing from the recipe module."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CalibrationConfig(BaseModel):
    """``calibration:``: the data that data-aware methods (fisher, regmean, adamerging) run the
    models on before merging (see docs/data_aware.md).

    ``data`` is a JSONL file (objects with ``text``, or ``prompt`` and optionally ``answer``) or a
    task folder (``spec.json`` + ``<split>.jsonl``) used for every model, or a mapping from each
    input model (as written under ``models``) to its own file or folder.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    data: str | dict[str, str]
    samples: int = Field(default=128, ge=1)  # examples read from each data source (file order)
    max_length: int = Field(default=128, ge=2)  # tokens per example; longer ones keep their end
    batch_size: int = Field(default=8, ge=1)
    split: str = "train"  # which split of a task folder
