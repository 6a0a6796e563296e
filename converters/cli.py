"""``segnode convert``: NIfTI case -> DICOM MR study, DICOM series -> NIfTI, synthetic Task01 folders.

Bad input raises :class:`converters.exceptions.ConverterError`; ``segnode`` prints it as one line and
exits with code 2.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from converters.case import MODALITIES, Case
from converters.exceptions import ConverterError, InvalidCaseError

console = Console(highlight=False)

convert_app = typer.Typer(
    name="convert",
    help="Convert between NIfTI cases and DICOM MR studies; write synthetic Task01 folders.",
    no_args_is_help=True,
)


def _load_any_case(path: Path) -> Case:
    """A BraTS case folder, or a Decathlon Task01 4D image (its label is not needed here)."""
    from converters.nifti import load_case, load_decathlon_case

    if path.is_dir():
        return load_case(path)
    if path.is_file() and path.name.endswith((".nii.gz", ".nii")):
        return load_decathlon_case(path, None)
    raise InvalidCaseError(f"{path}: not a case folder nor a .nii/.nii.gz Task01 image")


def _parse_modalities(value: str | None) -> list[str] | None:
    if value is None:
        return None
    chosen = [m.strip().upper() for m in value.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODALITIES]
    if unknown or not chosen:
        raise ConverterError(
            f"--modalities {value!r}: use a comma-separated subset of {','.join(MODALITIES)}"
        )
    return chosen


@convert_app.command("nifti-to-dicom")
def nifti_to_dicom(
    case_path: Path = typer.Argument(
        ..., metavar="CASE", help="BraTS case folder or Task01 4D .nii.gz image."
    ),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Folder for the DICOM study (created)."),
    modalities: str | None = typer.Option(
        None, "--modalities", "-m", help="Comma-separated subset, e.g. FLAIR,T1GD (default: all in the case)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for the synthetic patient attributes."),
) -> None:
    """Write a NIfTI case as a DICOM MR study: one axial series per modality, one file per slice."""
    from converters.dicom_writer import write_study

    case = _load_any_case(case_path)
    chosen = _parse_modalities(modalities) or [m for m in case.images]
    total = case.shape[2] * len([m for m in chosen if m in case.images])
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"writing {case.case_id}", total=total)
        info = write_study(
            case, out_dir, modalities=chosen, seed=seed, progress=lambda n: progress.advance(task, n)
        )
    console.print(f"StudyInstanceUID {info.study_instance_uid}", soft_wrap=True)
    for modality, series in info.series.items():
        console.print(
            f"  {modality:<6} {series.description:<14} {len(series.files):>4} files  "
            f"SeriesInstanceUID {series.series_instance_uid}  in {series.files[0].parent}",
            soft_wrap=True,
        )
    console.print(f"{len(info.series)} series, {info.n_files} files in {out_dir}", soft_wrap=True)


@convert_app.command("dicom-to-nifti")
def dicom_to_nifti(
    series_dir: Path = typer.Argument(..., metavar="SERIES_DIR", help="Folder holding one DICOM series."),
    out_file: Path = typer.Argument(..., metavar="OUT", help="NIfTI file to write (.nii.gz)."),
) -> None:
    """Assemble one DICOM series into a volume and write it as NIfTI in canonical RAS+ orientation."""
    import nibabel as nib

    from converters.dicom_series import load_series_folder
    from converters.reorient import volume_to_ras

    volume = load_series_folder(series_dir)
    array, affine = volume_to_ras(volume)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(out_file))
    spacing = ", ".join(f"{s:.4g}" for s in volume.spacing)
    console.print(
        f"{out_file}: shape {array.shape}, spacing (slice, row, column) {spacing} mm", soft_wrap=True
    )


@convert_app.command("synthetic")
def synthetic(
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Task01 folder to write (created)."),
    cases: int = typer.Option(6, "--cases", "-n", min=1, help="Number of cases."),
    seed: int = typer.Option(0, "--seed", help="Base seed; the same seed writes the same cases."),
    shape: str = typer.Option("64,64,40", "--shape", help="Voxel grid X,Y,Z of each case."),
) -> None:
    """Write a Decathlon Task01 folder of synthetic phantom cases (dataset.json, imagesTr, labelsTr)."""
    from converters.synthetic import write_synthetic_task01

    try:
        sizes = tuple(int(v) for v in shape.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 8:
        raise ConverterError(f"--shape {shape!r}: expected three integers of at least 8, e.g. 64,64,40")
    folder = write_synthetic_task01(out_dir, cases, seed, (sizes[0], sizes[1], sizes[2]))
    console.print(
        f"wrote {cases} synthetic cases of {sizes[0]}x{sizes[1]}x{sizes[2]} (seed {seed}) to {folder}"
    )

