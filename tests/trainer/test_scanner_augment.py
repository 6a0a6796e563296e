"""Scanner-like degradation of training cases (trainer/scanner_augment.py) and its use in training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from converters.case import Case
from converters.nifti import load_case
from tests.helpers.peers import require_shared
from trainer.scanner_augment import ScannerAugmentation, degrade_case

NOTHING = ScannerAugmentation(
    prob=1.0, thick_slice_prob=0, low_res_prob=0, bias_prob=0, noise_prob=0, gamma_prob=0, rotate_prob=0
)


@pytest.fixture(scope="module")
def flair_case() -> Case:
    """A real BraTS training case (FLAIR only), cut to the slab around its tumour to stay quick."""
    folder = sorted(p for p in require_shared("train/brats").iterdir() if p.is_dir())[0]
    case = load_case(folder)
    assert case.label is not None
    z = np.flatnonzero((case.label > 0).any(axis=(0, 1)))
    lo, hi = int(z.min()), int(z.max()) + 1
    return replace(
        case, images={"FLAIR": case.images["FLAIR"][:, :, lo:hi]}, label=case.label[:, :, lo:hi]
    )


def _roughness(image: np.ndarray, axis: int) -> float:
    """Mean absolute difference between neighbours along ``axis``, over the brain."""
    brain = image != 0
    diff = np.abs(np.diff(image, axis=axis))
    n = image.shape[axis]
    both = np.logical_and(np.take(brain, range(1, n), axis), np.take(brain, range(n - 1), axis))
    return float(diff[both].mean())


def test_off_returns_the_case_untouched(flair_case: Case) -> None:
    rng = np.random.default_rng(0)
    assert degrade_case(flair_case, rng, ScannerAugmentation(prob=0.0)) is flair_case


def test_thick_slices_blur_one_axis_and_keep_background_and_label(flair_case: Case) -> None:
    aug = replace(NOTHING, thick_slice_prob=1.0, slice_mm=(5.0, 5.0))
    out = degrade_case(flair_case, np.random.default_rng(1), aug)
    before, after = flair_case.images["FLAIR"], out.images["FLAIR"]
    assert after.shape == before.shape and out.affine is flair_case.affine
    ratios = [_roughness(after, a) / _roughness(before, a) for a in range(3)]
    blurred = int(np.argmin(ratios))
    # 5 mm slices along one axis: neighbours along it alike; partial volume smooths the others less
    assert ratios[blurred] < 0.6, ratios
    assert ratios[blurred] < 0.75 * min(r for a, r in enumerate(ratios) if a != blurred), ratios
    assert not after[before == 0].any()  # outside the brain stays zero, as the node's brain mask makes it
    np.testing.assert_array_equal(out.label, flair_case.label)


def test_rotation_moves_image_brain_and_label_together(flair_case: Case) -> None:
    aug = replace(NOTHING, rotate_prob=1.0, rotate_deg=10.0)
    out = degrade_case(flair_case, np.random.default_rng(2), aug)
    assert out.label is not None and flair_case.label is not None
    assert not np.array_equal(out.label, flair_case.label)
    tumour = out.label > 0
    inside = (out.images["FLAIR"] != 0)[tumour].mean()
    assert inside > 0.99  # the rotated tumour lies in the rotated brain
    assert abs(int(tumour.sum()) / int((flair_case.label > 0).sum()) - 1) < 0.1


def test_bias_noise_and_gamma_change_intensities_inside_the_brain_only(flair_case: Case) -> None:
    aug = replace(NOTHING, bias_prob=1.0, noise_prob=1.0, gamma_prob=1.0, noise_std=(0.03, 0.03))
    out = degrade_case(flair_case, np.random.default_rng(3), aug)
    before, after = flair_case.images["FLAIR"], out.images["FLAIR"]
    brain = before != 0
    assert not np.allclose(after[brain], before[brain], rtol=0.05)
    assert not after[~brain].any()
    again = degrade_case(flair_case, np.random.default_rng(3), aug)
    np.testing.assert_array_equal(again.images["FLAIR"], after)  # seeded: the same draw gives the same case


def test_noise_alone_keeps_a_z_scored_image_ordered(flair_case: Case) -> None:
    """Rician noise is a magnitude: a signed (z-scored, BraTS 2013) image is shifted non-negative first.

    Fed the signed image, sqrt((x + n1)^2 + n2^2) folded the negative half of the brain onto the
    positive one (|x|: correlation with the input about 0).
    """
    image = flair_case.images["FLAIR"].astype(np.float32)
    brain = image != 0
    z = np.zeros_like(image)
    z[brain] = (image[brain] - image[brain].mean()) / image[brain].std()
    assert (z[brain] < 0).mean() > 0.3
    case = replace(flair_case, images={"FLAIR": z})
    aug = replace(NOTHING, noise_prob=1.0, noise_std=(0.02, 0.02))
    out = degrade_case(case, np.random.default_rng(0), aug).images["FLAIR"]
    assert np.corrcoef(z[brain], out[brain])[0, 1] > 0.95
    assert not out[~brain].any()


def test_training_with_scanner_augment_validates_clean_and_degraded_copies(tmp_path: Path) -> None:
    from converters.synthetic import write_synthetic_task01
    from trainer.train import TrainConfig, Trainer

    data = write_synthetic_task01(tmp_path / "Task01_BrainTumour", 4, seed=9, shape=(48, 48, 24))
    config = TrainConfig(
        data=str(data), out=str(tmp_path / "run"), device="cpu", epochs=2, batch_size=8, base_filters=8,
        depth=3, crop_size=[48, 48], val_fraction=0.25, threads=1, scanner_augment=1.0,
    )
    trainer = Trainer(config, progress=False)
    summary = trainer.run()
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    ids = [c.case_id for c in trainer.val_cases]
    assert len(ids) == 2 and ids[1] == ids[0] + "+scanner"
    assert len(trainer.raw_train) == 3
