"""Format code shared by the node and the trainer: NIfTI cases, DICOM series, synthetic cases."""
