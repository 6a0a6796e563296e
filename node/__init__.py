"""The clinical node: DICOM SCP, job queue, series selection, inference, SEG/SR, sending."""
