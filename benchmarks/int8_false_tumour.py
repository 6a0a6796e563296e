"""The export's INT8 false-tumour check on models already exported: FP32 IR against INT8 IR.

``segnode export`` and ``segnode requantize`` hold each new INT8 network to its FP32 IR on false tumour
(``calibration.false_tumour_check``, trainer/false_tumour.py): the mL outlined beyond the label grown
by 2 mm, summed over the model's training and validation cases as they are and with their
less-affected hemisphere mirrored onto the other. This script runs the same check on models exported
before it existed (or with another ``--max-ratio``) and prints one row per model: FP32 mL, INT8 mL,
their ratio, the limit and the verdict, with the cases as they are and mirrored apart.

Only the cases of each model's own split are read, from ``--data`` (the holdout is refused), and of
those the ones holding every modality the model reads: a check of quantization fidelity, not of
accuracy on unseen cases.

Usage: python benchmarks/int8_false_tumour.py --data ../shared/data/train --model DIR [--model DIR ...]
       [--max-ratio 1.25] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, save_result

from db.card import load_card
from trainer.false_tumour import DEFAULT_MAX_RATIO


def split_refs(card: dict[str, Any], data: Path) -> list[Any]:
    """The ``CaseRef`` of each training and validation case of ``card`` under ``data``; ``SystemExit``
    when the card has no split or a case is missing."""
    from trainer.exceptions import TrainerError
    from trainer.export import split_refs as refs_of

    model = f"model {card['name']} {card['version']}"
    split = card.get("training", {}).get("split", {})
    if not split.get("train") and not split.get("val"):
        raise SystemExit(f"{model}: its card has no training split")
    try:
        refs = refs_of(split, data, "its")  # list_cases there refuses the holdout
    except TrainerError as exc:
        raise SystemExit(f"{model}: {exc}") from None
    return refs["train"] + refs["val"]


def measure(model: Path, data: Path, max_ratio: float) -> dict[str, Any]:
    """One model's row: the export's check (:func:`trainer.export.int8_false_tumour_check`) on its split."""
    from trainer.evaluate import load_model
    from trainer.export import int8_false_tumour_check

    card = load_card(model)
    fp32, int8 = load_model(model, "fp32"), load_model(model, "int8")
    check = int8_false_tumour_check(card, fp32.predict, int8.predict, split_refs(card, data), max_ratio)
    return {
        "model": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model),
        "name": card["name"],
        "version": card["version"],
        "check": check,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per model."""
    def cells(check: dict[str, Any]) -> list[Any]:
        if "skipped" in check:
            return [0, "-", "-", "-", "-", f"not checked: {check['skipped']}"]
        parts = check["parts"]
        return [
            len(check["cases"]),
            f"{parts['as_is']['fp32_ml']:.2f} / {parts['mirrored']['fp32_ml']:.2f}",
            f"{parts['as_is']['int8_ml']:.2f} / {parts['mirrored']['int8_ml']:.2f}",
            "-" if check["ratio"] is None else f"{check['ratio']:.2f}",
            f"{check['limit_ml']:.2f}",
            "passes" if check["passed"] else "FAILS",
        ]

    return markdown_table(
        ["model", "version", "cases", "FP32 as is / mirrored (mL)", "INT8 as is / mirrored (mL)",
         "INT8 / FP32", "limit (mL)", "check"],
        [[r["model"], r["version"], *cells(r["check"])] for r in rows],
    )  # fmt: skip


def main() -> int:
    """Run the check on each ``--model`` and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument("--max-ratio", type=float, default=DEFAULT_MAX_RATIO)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for model in args.model:
        rows.append(measure(model.resolve(), args.data, args.max_ratio))
        print(f"{model}: {rows[-1]['check']}", flush=True)
    markdown = table(rows)
    print(f"\n{markdown}")
    print(f"results in {save_result('int8_false_tumour', {'rows': rows, 'markdown': markdown}, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
