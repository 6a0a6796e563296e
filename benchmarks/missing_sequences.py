"""Per-region Dice of a sub-region model when a sequence is missing, on a run's VALIDATION cases.

For each validation case of the run that exported the model (its split.json), the model is run with
every modality, then with each of the card's ``optional_modalities`` missing (that channel all zero,
as :func:`trainer.data.prepare_case` feeds it in training), then with all of them missing (FLAIR
alone). Each is scored on the case's own grid: WT, TC and ET Dice. This reads the training data's
validation cases only; the holdout is for benchmarks/holdout_node.py.

Usage: python benchmarks/missing_sequences.py MODEL_DIR --run RUN_DIR [--precision int8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.nifti import list_cases
from converters.prediction import outputs_to_labels, predict_slices
from db.card import ir_xml, load_card
from trainer.data import prepare_case
from trainer.metrics import case_metrics
from trainer.predictors import openvino_predictor


def scenarios(optional: list[str]) -> list[tuple[str, list[str]]]:
    """(name, modalities left out): none, each optional one, and all of them."""
    out: list[tuple[str, list[str]]] = [("all four", [])] + [(f"no {m}", [m]) for m in optional]
    if len(optional) > 1:
        out.append(("FLAIR only" if len(optional) == 3 else "no " + "+".join(optional), list(optional)))
    return out


def main() -> None:
    """Run the check and print a table (and write JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--run", type=Path, required=True, help="The training run (split.json, run.json).")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    card = load_card(args.model)
    optional = list(card.get("optional_modalities", []))
    predict = openvino_predictor(card, ir_xml(card, args.model, args.precision))
    run = json.loads((args.run / "run.json").read_text())
    val = json.loads((args.run / "split.json").read_text())["val"]
    refs = {r.case_id: r for r in list_cases(Path(run["config"]["data"]), require_labels=True)}
    pre, mods, task = card["preprocessing"], card["modalities"], card["task"]
    rows: list[dict[str, Any]] = []
    for case_id in val:
        case = refs[case_id].load()
        for name, dropped in scenarios(optional):
            lacking = replace(case, images={m: v for m, v in case.images.items() if m not in dropped})
            prepared = prepare_case(lacking, pre, mods, task, optional)
            labels = outputs_to_labels(predict_slices(predict, prepared.prepared.slices), card["output"])
            scores = case_metrics(prepared.prepared.restore(labels), prepared.target, case.spacing, task)
            dice = {region: s["dice"] for region, s in scores["regions"].items()}
            rows.append({"case": case_id, "inputs": name, **dice})
    print(f"{card['name']} {card['version']} {args.precision.upper()}, validation cases, Dice")
    print(f"{'case':<22} {'inputs':<12} {'WT':>7} {'TC':>7} {'ET':>7}")
    for row in rows:
        print(f"{row['case']:<22} {row['inputs']:<12} {row['WT']:7.4f} {row['TC']:7.4f} {row['ET']:7.4f}")
    for name, _ in scenarios(optional):
        sel = [r for r in rows if r["inputs"] == name]
        means = {k: float(np.mean([r[k] for r in sel])) for k in ("WT", "TC", "ET")}
        print(f"{'mean':<22} {name:<12} {means['WT']:7.4f} {means['TC']:7.4f} {means['ET']:7.4f}")
    if args.json:
        result = {"model": str(args.model), "precision": args.precision, "rows": rows}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
