"""The clinical node: DICOM SCP, job queue, series selection, inference, SEG/SR, sending."""

#: The node's log line, the same in ``segnode`` and in its extra receiver processes (node/receivers.py).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
