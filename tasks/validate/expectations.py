"""The Great Expectations suite over parsed records: no nulls, string lengths, duplicate rate, overlap rate.

A failed expectation becomes a DataError that names the file, the line and the field of its first
unexpected row, like the line checks of records.py do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tasks.validate.split import first_lines, prompt_side
from tuneline.config import Validate
from tuneline.errors import DataError
from tuneline.formats import FIELDS

PROMPT_FIELDS = {"instruction": "instruction+input", "chat": "messages", "completion": "prompt", "preference": "prompt"}


def _mostly(max_rate: float) -> float:
    # GX passes when the share of expected rows >= mostly; the epsilon absorbs float error in 1 - rate.
    return max(0.0, 1.0 - max_rate - 1e-12)


class Suite:
    """Great Expectations over one split: a records table (one row per line) and a texts table."""

    def __init__(self, fmt: str, cfg: Validate):
        os.environ["GX_ANALYTICS_ENABLED"] = "False"  # must precede the import: no usage reporting
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self.gxe, self.fmt, self.cfg = gxe, fmt, cfg
        # In memory only: no data-docs temp folder, no progress bars in the stage's output.
        config = DataContextConfig(progress_bars=ProgressBarsConfig(globally=False),
                                   store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False))
        context = gx.get_context(mode="ephemeral", project_config=config)
        self.source = context.data_sources.add_pandas("tuneline")

    def _validate(self, name: str, frame, exp) -> tuple[bool, int | None]:
        """(success, index label of the first unexpected row)."""
        whole = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        batch = whole.get_batch(batch_parameters={"dataframe": frame})
        res = batch.validate(exp, result_format={"result_format": "SUMMARY", "partial_unexpected_count": 1})
        return bool(res.success), min(res.result.get("partial_unexpected_index_list") or [None])

    def check(self, split: str, path: Path, records: list[dict], lines: list[int],
              train: tuple[Path, dict[str, int]] | None = None) -> dict[str, Any]:
        """Stats of one split; DataError on its first failed expectation. `train`: (path, prompt -> line)."""
        import pandas as pd

        fmt, cfg, gxe = self.fmt, self.cfg, self.gxe
        texts = []  # (line, field, text) for every string: one long table serves every format
        for line, r in zip(lines, records, strict=True):
            if fmt == "chat":
                texts += [(line, f"messages[{i}].content", m["content"]) for i, m in enumerate(r["messages"])]
            else:  # an empty optional field means "absent", not a too-short string
                texts += [(line, k, v) for k, v in r.items() if v or FIELDS[fmt][k][0]]
        texts = pd.DataFrame(texts, columns=["line", "field", "text"])
        required = [name for name, (req, _) in FIELDS[fmt].items() if req]
        recs = pd.DataFrame([{k: r[k] for k in required} for r in records], index=lines)
        # A duplicate repeats every field of an earlier record; an overlap repeats a train prompt.
        keys = [json.dumps(r, sort_keys=True) for r in records]
        seen = first_lines(keys, lines)
        dups = {line: seen[k] for k, line in zip(keys, lines, strict=True) if seen[k] != line}
        recs["is_duplicate"] = [line in dups for line in lines]
        n = len(records)
        stats: dict[str, Any] = {"file": str(path), "records": n, "duplicates": len(dups),
                                 "duplicate_rate": round(len(dups) / n, 6)}
        lengths = texts.text.str.len().groupby(texts.field.str.replace(r"\[\d+\]", "", regex=True)).max()
        stats["max_chars"] = {field: int(m) for field, m in lengths.items()}
        suite = [(recs, gxe.ExpectColumnValuesToNotBeNull(column=k)) for k in required] + [
            (texts, gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1,
                                                            max_value=cfg.max_chars_per_field)),
            (recs, gxe.ExpectColumnValuesToBeInSet(column="is_duplicate", value_set=[False],
                                                   mostly=_mostly(cfg.max_duplicate_rate)))]
        if train is not None:
            prompts = [prompt_side(r, fmt) for r in records]
            overlaps = {line: train[1][p] for p, line in zip(prompts, lines, strict=True) if p in train[1]}
            recs["in_train"] = [line in overlaps for line in lines]
            stats.update(overlapping=len(overlaps), overlap_rate=round(len(overlaps) / n, 6))
            suite.append((recs, gxe.ExpectColumnValuesToBeInSet(column="in_train", value_set=[False],
                                                                mostly=_mostly(cfg.max_overlap_rate))))
        stats["expectations"] = []
        for i, (frame, exp) in enumerate(suite):
            ok, row = self._validate(f"{split}_{i}", frame, exp)
            stats["expectations"].append({"split": split, "expectation": exp.expectation_type,
                                          "column": exp.column, "success": ok})
            if ok:
                continue
            if exp.column == "is_duplicate":
                raise DataError(path, row, "+".join(FIELDS[fmt]), (
                    f"duplicate rate {stats['duplicate_rate']:.3g} exceeds validate.max_duplicate_rate "
                    f"{cfg.max_duplicate_rate}; first duplicate at this line (repeats line {dups[row]})"))
            if exp.column == "in_train":
                raise DataError(path, row, PROMPT_FIELDS[fmt], (
                    f"train/eval overlap rate {stats['overlap_rate']:.3g} exceeds validate.max_overlap_rate "
                    f"{cfg.max_overlap_rate}; first overlap at this line (its prompt is also in {train[0]} "
                    f"line {overlaps[row]})"))
            if exp.column == "text":
                t = texts.loc[row]
                raise DataError(path, int(t.line), t.field, f"length {len(t.text or '')} is outside 1.."
                                f"{cfg.max_chars_per_field} (validate.max_chars_per_field)")
            raise DataError(path, row, exp.column, "is null")
        return stats
