"""Missing sequences: optional modalities as zero channels, channel dropout, validation on complete cases."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from converters.synthetic import make_synthetic_case
from trainer.data import (
    drop_channels,
    missing_modalities,
    prepare_case,
    split_by_completeness,
    split_cases,
    zero_missing_channels,
)
from trainer.exceptions import TrainerError

pytest.importorskip("torch")

FOUR = ["FLAIR", "T1", "T1GD", "T2"]
OPTIONAL = ["T1", "T1GD", "T2"]
PRE = {"orientation": "RAS", "spacing_mm": [4.0, 4.0, 4.0], "crop_size": [48, 48], "slice_axis": 2}


def test_missing_modalities_names_what_is_required() -> None:
    assert missing_modalities(["FLAIR", "T1GD"], FOUR, OPTIONAL) == ["T1", "T2"]
    assert missing_modalities(FOUR, FOUR, ()) == []
    with pytest.raises(TrainerError, match=r"lacks FLAIR \(required: FLAIR\)"):
        missing_modalities(["T1", "T1GD", "T2"], FOUR, OPTIONAL)
    with pytest.raises(TrainerError, match="lacks T2"):
        missing_modalities(["FLAIR", "T1", "T1GD"], FOUR, ())


def test_zero_missing_channels_puts_each_held_channel_in_its_place() -> None:
    held = np.stack([np.full((3, 4, 4), v, np.float32) for v in (1.0, 3.0)], axis=1)  # FLAIR, T1GD
    out = zero_missing_channels(held, ["FLAIR", "T1GD"], FOUR)
    assert out.shape == (3, 4, 4, 4)
    assert [float(out[:, c].max()) for c in range(4)] == [1.0, 0.0, 3.0, 0.0]
    assert [float(out[:, c].min()) for c in range(4)] == [1.0, 0.0, 3.0, 0.0]
    # With context slices each modality is a group of channels (its slice and neighbours), kept together.
    grouped = np.stack([np.full((3, 4, 4), v, np.float32) for v in (1, 2, 3, 4, 5, 6)], axis=1)
    out = zero_missing_channels(grouped, ["FLAIR", "T1GD"], FOUR, per_modality=3)
    assert out.shape == (3, 12, 4, 4)
    assert [float(out[0, c, 0, 0]) for c in range(12)] == [1, 2, 3, 0, 0, 0, 4, 5, 6, 0, 0, 0]


def test_drop_channels_never_touches_flair_and_draws_every_subset() -> None:
    image = np.ones((4, 8, 8), np.float32)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        out = drop_channels(image, [(1,), (2,), (3,)], 1.0, rng)
        assert out[0].min() == 1.0  # FLAIR kept
        zeroed = frozenset(int(c) for c in range(1, 4) if out[c].max() == 0.0)
        assert zeroed  # probability 1: at least one channel goes
        assert all(out[c].min() == 1.0 for c in range(1, 4) if c not in zeroed)
        seen.add(zeroed)
    assert len(seen) == 7  # every non-empty subset of {T1, T1GD, T2}
    assert image.min() == 1.0  # the input is not changed
    assert drop_channels(image, [(1,), (2,), (3,)], 0.0, rng) is image
    kept = sum(drop_channels(image, [(1,), (2,), (3,)], 0.25, rng)[1:].min() == 1.0 for _ in range(2000))
    assert 0.70 < kept / 2000 < 0.80


def test_drop_channels_zeroes_a_modality_with_its_context_slices() -> None:
    # FLAIR, T1, T2 with one neighbour each side: channels 0-2, 3-5, 6-8; T1 and T2 optional.
    image = np.ones((9, 4, 4), np.float32)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(200):
        out = drop_channels(image, [(3, 4, 5), (6, 7, 8)], 1.0, rng)
        zeroed = frozenset(c for c in range(9) if out[c].max() == 0.0)
        assert zeroed in ({3, 4, 5}, {6, 7, 8}, {3, 4, 5, 6, 7, 8})  # whole modalities, never FLAIR
        seen.add(zeroed)
    assert len(seen) == 3


def test_split_validates_on_complete_cases_and_trains_on_the_rest() -> None:
    held = {f"full_{i}": tuple(FOUR) for i in range(8)}
    held |= {f"flair_t1c_{i}": ("FLAIR", "T1GD") for i in range(3)}
    held["t1_only"] = ("T1",)
    split = split_by_completeness(held, FOUR, OPTIONAL, 0.25, seed=3)
    assert len(split["val"]) == 2 and all(c.startswith("full_") for c in split["val"])
    assert split["incomplete"] == ["flair_t1c_0", "flair_t1c_1", "flair_t1c_2"]
    assert set(split["incomplete"]) <= set(split["train"])
    assert split["skipped"] == ["t1_only"] and "t1_only" not in split["train"]
    assert not set(split["train"]) & set(split["val"])
    # Without optional modalities (and all cases complete) it is the plain patient split.
    full = {c: m for c, m in held.items() if c.startswith("full_")}
    assert split_by_completeness(full, FOUR, (), 0.25, seed=3) == split_cases(sorted(full), 0.25, 3)


def test_prepared_case_without_t2_has_a_zero_t2_channel_and_the_same_others() -> None:
    case = make_synthetic_case(11, shape=(32, 32, 20))
    full = prepare_case(case, PRE, FOUR, "brats_regions")
    lacking = replace(case, images={m: v for m, v in case.images.items() if m != "T2"})
    part = prepare_case(lacking, PRE, FOUR, "brats_regions", optional=OPTIONAL)
    assert part.prepared.slices.shape == full.prepared.slices.shape
    assert not part.prepared.slices[:, 3].any()
    np.testing.assert_allclose(part.prepared.slices[:, :3], full.prepared.slices[:, :3], atol=1e-5)
    np.testing.assert_array_equal(part.target_planes, full.target_planes)
    with pytest.raises(TrainerError, match="lacks T2"):
        prepare_case(lacking, PRE, FOUR, "brats_regions")


def test_config_refuses_dropout_without_optional_channels_and_records_them_in_the_card() -> None:
    from trainer.train import TrainConfig, card_base

    base = dict(data="d", out="o", task="brats_regions", modalities=FOUR, crop_size=[48, 48], depth=3)
    with pytest.raises(TrainerError, match="--channel-dropout needs --optional-modalities"):
        TrainConfig(**base, channel_dropout=0.2).check()  # type: ignore[arg-type]
    with pytest.raises(TrainerError, match="ADC not among"):
        TrainConfig(**base, optional_modalities=["ADC"]).check()  # type: ignore[arg-type]
    with pytest.raises(TrainerError, match="at least one modality required"):
        TrainConfig(**base, optional_modalities=FOUR).check()  # type: ignore[arg-type]
    config = TrainConfig(**base, optional_modalities=["T2", "T1"], channel_dropout=0.2)  # type: ignore[arg-type]
    config.check()
    assert card_base(config, [1.0, 1.0, 1.0])["optional_modalities"] == ["T1", "T2"]
    assert "optional_modalities" not in card_base(TrainConfig(**base), [1.0, 1.0, 1.0])  # type: ignore[arg-type]
    assert config.droppable_channels() == [(1,), (3,)]  # T1 and T2 of FLAIR, T1, T1GD, T2
    context = TrainConfig(**base, optional_modalities=["T2", "T1"], context_slices=1)  # type: ignore[arg-type]
    assert context.droppable_channels() == [(3, 4, 5), (9, 10, 11)]  # each with its two neighbours
